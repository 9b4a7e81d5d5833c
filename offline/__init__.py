"""The workstation side of edge-awq: calibration, AWQ search and export (torch allowed here).

Installed as ``edge_awq.offline`` by the ``[offline]`` extra; the device side
(``edge_awq``) never imports it.
"""
