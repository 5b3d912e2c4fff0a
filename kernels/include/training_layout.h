// The memory layout the training kernels (fake_quant.cpp, sign_estimator.cpp) compute in and
// return: a channels-last tensor stays channels-last, any other becomes contiguous, so each
// output channel is one contiguous block. qtool/quant/fake_quant.py (kernel_layout) mirrors it,
// so that the fake kernels predict the real outputs' strides.
#pragma once

#include <ATen/core/Tensor.h>

namespace qtool {

inline at::MemoryFormat training_layout(const at::Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                          : at::MemoryFormat::Contiguous;
}

}  // namespace qtool
