// Placeholder until the K2 kernel lands: throws.
#include <stdexcept>
#include "ops.h"
namespace flashdistill { namespace cpu {
void score_identity_forward(int64_t, int64_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t,
                            uintptr_t, double, uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, double, uintptr_t,
                            uintptr_t, int64_t, uintptr_t) {
  throw std::runtime_error("score_identity_forward: not implemented yet");
}
int64_t score_identity_workspace_bytes(int64_t, int64_t, int64_t) { return 0; }
void score_identity_backward(int64_t, int64_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t,
                             uintptr_t, double, uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, double, uintptr_t,
                             uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t) {
  throw std::runtime_error("score_identity_backward: not implemented yet");
}
}}
