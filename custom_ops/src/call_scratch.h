// Per-call scratch memory from onnxruntime's allocator for the kernel context, reserved in pieces
// and allocated once, freed when the call returns. The CPU kernel takes its activation codes and
// tile buffers from it and the CUDA kernel its device buffers, so neither allocates on its own.
#pragma once

#ifndef ORT_API_MANUAL_INIT
#error "build with -DORT_API_MANUAL_INIT: the API table comes from the OrtApiBase given to RegisterCustomOps"
#endif
#include <onnxruntime_cxx_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "serq_layout.h"

namespace serq {

class CallScratch {
 public:
  // `align`: alignment of every piece (a power of two); `what` names the memory in errors.
  CallScratch(OrtKernelContext* ctx, const OrtMemoryInfo* info, size_t align, const char* what)
      : align_(align), what_(what) {
    Ort::ThrowOnError(Ort::GetApi().KernelContext_GetAllocator(ctx, info, &alloc_));
  }
  ~CallScratch() {
    if (p_) alloc_->Free(alloc_, p_);
    Ort::GetApi().ReleaseAllocator(alloc_);
  }
  CallScratch(const CallScratch&) = delete;
  CallScratch& operator=(const CallScratch&) = delete;

  // Reserves `bytes`; returns the offset of the piece in the buffer Allocate() returns.
  size_t Reserve(size_t bytes) {
    const size_t off = size_;
    size_ += (bytes + align_ - 1) / align_ * align_;
    if (size_ < off) throw OpError(std::string("scratch size overflow (") + what_ + ")");
    return off;
  }
  // The whole buffer (nullptr when nothing was reserved); the pieces start at their offsets.
  uint8_t* Allocate() {
    if (!size_) return nullptr;
    p_ = alloc_->Alloc(alloc_, size_);
    if (!p_) {
      throw OpError(std::string("onnxruntime's allocator could not provide ") + std::to_string(size_) +
                    " bytes of " + what_);
    }
    return static_cast<uint8_t*>(p_);
  }

 private:
  OrtAllocator* alloc_ = nullptr;
  void* p_ = nullptr;
  size_t size_ = 0;
  size_t align_;
  const char* what_;
};

}  // namespace serq
