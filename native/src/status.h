/* Status codes and the per-thread last-error message shared by the library's sources. */
#ifndef EAWQ_STATUS_H
#define EAWQ_STATUS_H

#include <cuda_runtime.h>

#include "edge_awq_cuda.h"

/* Record a message for eawq_last_error() and return status. */
int eawq_fail(int status, const char *fmt, ...);

/* EAWQ_OK, or EAWQ_ERR_CUDA with the CUDA error's name and text and what was being done. */
int eawq_check(cudaError_t err, const char *what);

#endif
