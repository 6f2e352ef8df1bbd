// Placeholder until the K1 kernel lands (dmd.cpp generalized): throws.
#include <stdexcept>
#include "ops.h"
namespace flashdistill { namespace cpu {
void score_diff_forward(int64_t, int64_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, int64_t,
                        uintptr_t, double, uintptr_t, int64_t, uintptr_t, int64_t, uintptr_t, double, uintptr_t,
                        int64_t, uintptr_t, uintptr_t, int64_t, double, double, double, uintptr_t, uintptr_t,
                        uintptr_t, int64_t, uintptr_t) {
  throw std::runtime_error("score_diff_forward: not implemented yet");
}
int64_t score_diff_workspace_bytes(int64_t, int64_t, int64_t) { return 0; }
}}
