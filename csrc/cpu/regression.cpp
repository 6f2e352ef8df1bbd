// Placeholder until the K3/K5 kernel lands: throws.
#include <stdexcept>
#include "ops.h"
namespace flashdistill { namespace cpu {
void regression_forward(int64_t, int64_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t,
                        uintptr_t, int64_t, double, uintptr_t, uintptr_t, int64_t, uintptr_t) {
  throw std::runtime_error("regression_forward: not implemented yet");
}
int64_t regression_workspace_bytes(int64_t, int64_t, int64_t) { return 0; }
void regression_backward(int64_t, int64_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t,
                         uintptr_t, int64_t, double, uintptr_t, uintptr_t, uintptr_t) {
  throw std::runtime_error("regression_backward: not implemented yet");
}
}}
