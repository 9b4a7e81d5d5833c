"""Files and formats: the checking safetensors reader, the ``.eawq`` file (read, write, checksums), the
sources users hold (``sources/``: Hugging Face directories with their AWQ layouts, GGUF, llama2.c), the
tokenizer, Hugging Face directories written and converted (``hf_writer.py``, ``interop.py``), and outputs
written atomically (``atomic.py``). ``load.py`` turns any source into the model's weights.
"""
