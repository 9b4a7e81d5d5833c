/* Errors, devices, buffers and streams of libedge_awq_cuda.so; the host-side 4-bit repack. */
#include <cstdarg>
#include <cstdio>

#include "eawq_arith.h"
#include "status.h"

static thread_local char last_error[512] = "";

int eawq_fail(int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

int eawq_check(cudaError_t err, const char *what)
{
    if (err == cudaSuccess)
        return EAWQ_OK;
    int status = EAWQ_ERR_CUDA;
    if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver)
        status = EAWQ_ERR_NO_DEVICE;
    else if (err == cudaErrorMemoryAllocation)
        status = EAWQ_ERR_OOM;
    cudaGetLastError(); /* clear a non-sticky error so that the next call starts clean */
    return eawq_fail(status, "%s: %s (%s)", what, cudaGetErrorString(err), cudaGetErrorName(err));
}

extern "C" {

int eawq_abi_version(void) { return EAWQ_ABI_VERSION; }

const char *eawq_status_str(int status)
{
    switch (status) {
    case EAWQ_OK: return "ok";
    case EAWQ_ERR_CUDA: return "CUDA error";
    case EAWQ_ERR_NO_DEVICE: return "no CUDA device";
    case EAWQ_ERR_SHAPE: return "shape not supported";
    case EAWQ_ERR_ARG: return "invalid argument";
    case EAWQ_ERR_OOM: return "out of device memory";
    default: return "unknown status";
    }
}

const char *eawq_last_error(void) { return last_error; }

int eawq_device_count(int *count)
{
    *count = 0;
    cudaError_t err = cudaGetDeviceCount(count);
    if (err == cudaErrorInsufficientDriver) {
        cudaGetLastError();
        return eawq_fail(EAWQ_ERR_NO_DEVICE, "no usable NVIDIA driver: libcuda.so.1 is missing or older than the "
                         "CUDA %d.%d runtime this library was built with", CUDART_VERSION / 1000,
                         CUDART_VERSION % 1000 / 10);
    }
    int rc = eawq_check(err, "cudaGetDeviceCount");
    if (rc == EAWQ_OK && *count == 0)
        rc = eawq_fail(EAWQ_ERR_NO_DEVICE, "cudaGetDeviceCount: no CUDA device");
    return rc;
}

int eawq_device_name(int device, char *name, size_t len)
{
    cudaDeviceProp prop;
    int rc = eawq_check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    if (rc == EAWQ_OK)
        snprintf(name, len, "%s (sm_%d%d)", prop.name, prop.major, prop.minor);
    return rc;
}

int eawq_set_device(int device) { return eawq_check(cudaSetDevice(device), "cudaSetDevice"); }

int eawq_mem_info(size_t *free_bytes, size_t *total_bytes)
{
    return eawq_check(cudaMemGetInfo(free_bytes, total_bytes), "cudaMemGetInfo");
}

int eawq_malloc(void **ptr, size_t bytes)
{
    *ptr = nullptr;
    return eawq_check(cudaMalloc(ptr, bytes > 0 ? bytes : 1), "cudaMalloc");
}

int eawq_free(void *ptr) { return eawq_check(cudaFree(ptr), "cudaFree"); }

int eawq_memset(void *ptr, int value, size_t bytes, eawq_stream_t stream)
{
    return eawq_check(cudaMemsetAsync(ptr, value, bytes, (cudaStream_t)stream), "cudaMemsetAsync");
}

int eawq_copy_to_device(void *dst, const void *src, size_t bytes, eawq_stream_t stream)
{
    return eawq_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, (cudaStream_t)stream),
                      "cudaMemcpyAsync to the device");
}

int eawq_copy_to_host(void *dst, const void *src, size_t bytes, eawq_stream_t stream)
{
    /* the host buffer is pageable: the copy is complete when this returns */
    int rc = eawq_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)stream),
                        "cudaMemcpyAsync to the host");
    return rc == EAWQ_OK ? eawq_check(cudaStreamSynchronize((cudaStream_t)stream), "cudaStreamSynchronize") : rc;
}

int eawq_stream_create(eawq_stream_t *stream)
{
    cudaStream_t s = nullptr;
    int rc = eawq_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    *stream = (eawq_stream_t)s;
    return rc;
}

int eawq_stream_destroy(eawq_stream_t stream)
{
    return eawq_check(cudaStreamDestroy((cudaStream_t)stream), "cudaStreamDestroy");
}

int eawq_synchronize(eawq_stream_t stream)
{
    return eawq_check(cudaStreamSynchronize((cudaStream_t)stream), "cudaStreamSynchronize");
}

int eawq_repack_w4(uint32_t *words, size_t n_words)
{
    if (words == nullptr && n_words > 0)
        return eawq_fail(EAWQ_ERR_ARG, "eawq_repack_w4: words is NULL");
    for (size_t i = 0; i < n_words; ++i)
        words[i] = eawq_interleave_w4(words[i]);
    return EAWQ_OK;
}

} /* extern "C" */
