#include "lpo_cuda.h"

namespace lpo {
const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
}  // namespace lpo
