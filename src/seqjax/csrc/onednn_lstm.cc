// oneDNN's fused LSTM primitive (forward and backward) as XLA FFI handlers for seqjax.onednn.
//
// The layouts are seqjax's (and oneDNN's user formats): x [T, N, I] time-major, h [N, P], c [N, H],
// w_x [I, 4H] and w_h [P, 4H] with gate blocks (i, f, g, o) (oneDNN's ldigo), b [4H] (ldgo),
// peep [3, H] (rows i, f, o; ldgo), w_proj [H, P] (ldio). P = H without projection. An absent
// peep or w_proj is passed as a zero-size buffer. All float32.
//
// Primitive descriptors and primitives are built once per shape and cached; the packed weights
// (oneDNN picks their layout, `format_tag::any`) are reordered from the user layout on every call.
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;

namespace {

struct Shape {
  int64_t T, N, I, H, P;
  bool peep, proj, reverse;
  auto key() const { return std::make_tuple(T, N, I, H, P, peep, proj, reverse); }
  bool operator<(const Shape& o) const { return key() < o.key(); }
};

dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

memory::desc f32(memory::dims dims, tag t) { return memory::desc(dims, memory::data_type::f32, t); }

// The user-layout descriptors of one shape; ``any`` replaces the weights' layouts for oneDNN to choose.
struct Descs {
  memory::desc src_layer, src_iter, src_iter_c, w_layer, w_iter, w_peep, w_proj, bias, dst_layer, dst_iter,
      dst_iter_c;
  Descs(const Shape& s, bool any) {
    tag wt = any ? tag::any : tag::ldigo;
    src_layer = f32({s.T, s.N, s.I}, tag::tnc);
    src_iter = f32({1, 1, s.N, s.P}, tag::ldnc);
    src_iter_c = f32({1, 1, s.N, s.H}, tag::ldnc);
    w_layer = f32({1, 1, s.I, 4, s.H}, wt);
    w_iter = f32({1, 1, s.P, 4, s.H}, wt);
    w_peep = s.peep ? f32({1, 1, 3, s.H}, tag::ldgo) : memory::desc();
    w_proj = s.proj ? f32({1, 1, s.H, s.P}, any ? tag::any : tag::ldio) : memory::desc();
    bias = f32({1, 1, 4, s.H}, tag::ldgo);
    dst_layer = f32({s.T, s.N, s.P}, tag::tnc);
    dst_iter = f32({1, 1, s.N, s.P}, tag::ldnc);
    dst_iter_c = f32({1, 1, s.N, s.H}, tag::ldnc);
  }
};

dnnl::rnn_direction direction(const Shape& s) {
  return s.reverse ? dnnl::rnn_direction::unidirectional_right2left
                   : dnnl::rnn_direction::unidirectional_left2right;
}

// The primitives take their scratchpad from the caller (`scratchpad`), not from oneDNN's global one,
// which is per creating thread: XLA runs the kernels on its own worker threads.
dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// This thread's scratchpad, grown as needed and kept for the next call (no fresh pages per call).
memory scratchpad(const memory::desc& md) {
  thread_local std::unique_ptr<void, decltype(&std::free)> buffer(nullptr, &std::free);
  thread_local size_t capacity = 0;
  size_t size = (md.get_size() + 4095) / 4096 * 4096;
  if (size > capacity) {
    buffer.reset(std::aligned_alloc(4096, size));
    if (!buffer) throw std::bad_alloc();
    capacity = size;
  }
  return memory(md, cpu_engine(), buffer.get());
}

dnnl::lstm_forward::primitive_desc forward_pd(const Shape& s, dnnl::prop_kind kind) {
  Descs d(s, true);
  return dnnl::lstm_forward::primitive_desc(cpu_engine(), kind, direction(s), d.src_layer, d.src_iter,
                                            d.src_iter_c, d.w_layer, d.w_iter, d.w_peep, d.w_proj, d.bias,
                                            d.dst_layer, d.dst_iter, d.dst_iter_c, user_scratchpad());
}

struct Forward {
  dnnl::lstm_forward::primitive_desc pd;
  dnnl::lstm_forward prim;
};

struct Backward {
  dnnl::lstm_backward::primitive_desc pd;
  dnnl::lstm_backward prim;
};

std::mutex cache_mutex;

// training: forward_training (writes the workspace the backward reads); else forward_inference.
const Forward& forward(const Shape& s, bool training) {
  static std::map<std::pair<Shape, bool>, std::unique_ptr<Forward>> cache;
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto& slot = cache[{s, training}];
  if (!slot) {
    auto pd = forward_pd(s, training ? dnnl::prop_kind::forward_training : dnnl::prop_kind::forward_inference);
    slot.reset(new Forward{pd, dnnl::lstm_forward(pd)});
  }
  return *slot;
}

const Backward& backward(const Shape& s) {
  static std::map<Shape, std::unique_ptr<Backward>> cache;
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto& slot = cache[s];
  if (!slot) {
    Descs d(s, true);
    auto hint = forward_pd(s, dnnl::prop_kind::forward_training);
    auto pd = dnnl::lstm_backward::primitive_desc(
        cpu_engine(), dnnl::prop_kind::backward, direction(s), d.src_layer, d.src_iter, d.src_iter_c, d.w_layer,
        d.w_iter, d.w_peep, d.w_proj, d.bias, d.dst_layer, d.dst_iter, d.dst_iter_c, d.src_layer, d.src_iter,
        d.src_iter_c, d.w_layer, d.w_iter, d.w_peep, d.w_proj, d.bias, d.dst_layer, d.dst_iter, d.dst_iter_c,
        hint, user_scratchpad());
    slot.reset(new Backward{pd, dnnl::lstm_backward(pd)});
  }
  return *slot;
}

// A user buffer, or, where the primitive wants another layout, a fresh buffer in that layout.
struct Operand {
  memory user, prim;
  Operand(const memory::desc& user_md, const memory::desc& prim_md, void* data)
      : user(user_md, cpu_engine(), data), prim(user_md == prim_md ? user : memory(prim_md, cpu_engine())) {}
  bool packed() const { return user.get_data_handle() != prim.get_data_handle(); }
  void to_prim(dnnl::stream& st) {
    if (packed()) dnnl::reorder(user, prim).execute(st, user, prim);
  }
  void to_user(dnnl::stream& st) {
    if (packed()) dnnl::reorder(prim, user).execute(st, prim, user);
  }
};

memory wrap(const memory::desc& md, void* data) { return memory(md, cpu_engine(), data); }

Shape shape_of(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& c0, ffi::Buffer<ffi::F32>& w_h,
               ffi::Buffer<ffi::F32>& peep, ffi::Buffer<ffi::F32>& w_proj, bool reverse) {
  auto xd = x.dimensions(), cd = c0.dimensions(), wd = w_h.dimensions();
  return Shape{xd[0], xd[1], xd[2], cd[1], wd[0], peep.element_count() > 0, w_proj.element_count() > 0, reverse};
}

// Runs every oneDNN call on one thread of its own. GNU OpenMP keeps a thread team per thread that
// opens a parallel region, and XLA calls the handlers from any of its workers: without this each
// worker grows its own spinning team and they fight over the cores (3x slower on 2 cores).
class Executor {
 public:
  void run(const std::function<void()>& task) {
    std::packaged_task<void()> job(task);
    auto done = job.get_future();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!worker_.joinable()) worker_ = std::thread([this] { loop(); });
      jobs_.push_back(std::move(job));
    }
    ready_.notify_one();
    done.get();  // rethrows the task's exception
  }

 private:
  void loop() {
    for (;;) {
      std::packaged_task<void()> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return !jobs_.empty(); });
        job = std::move(jobs_.front());
        jobs_.erase(jobs_.begin());
      }
      job();
    }
  }
  std::mutex mutex_;
  std::condition_variable ready_;
  std::vector<std::packaged_task<void()>> jobs_;
  std::thread worker_;
};

Executor& executor() {
  static Executor* e = new Executor();  // never destroyed: its thread lives as long as the process
  return *e;
}

template <typename F>
ffi::Error guarded(F&& body) {
  try {
    executor().run(body);
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("seqjax.onednn: oneDNN failed: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("seqjax.onednn: ") + e.what());
  }
}

ffi::Error LstmForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                           ffi::Buffer<ffi::F32> w_x, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> b,
                           ffi::Buffer<ffi::F32> peep, ffi::Buffer<ffi::F32> w_proj,
                           ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> hT,
                           ffi::ResultBuffer<ffi::F32> cT, ffi::ResultBuffer<ffi::U8> workspace, bool training,
                           bool reverse) {
  return guarded([&] {
    Shape s = shape_of(x, c0, w_h, peep, w_proj, reverse);
    const Forward& f = forward(s, training);
    Descs d(s, false);
    dnnl::stream st(cpu_engine());
    Operand wl(d.w_layer, f.pd.weights_layer_desc(), w_x.untyped_data());
    Operand wi(d.w_iter, f.pd.weights_iter_desc(), w_h.untyped_data());
    wl.to_prim(st);
    wi.to_prim(st);
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC_LAYER, wrap(d.src_layer, x.untyped_data())},
        {DNNL_ARG_SRC_ITER, wrap(d.src_iter, h0.untyped_data())},
        {DNNL_ARG_SRC_ITER_C, wrap(d.src_iter_c, c0.untyped_data())},
        {DNNL_ARG_WEIGHTS_LAYER, wl.prim},
        {DNNL_ARG_WEIGHTS_ITER, wi.prim},
        {DNNL_ARG_BIAS, wrap(d.bias, b.untyped_data())},
        {DNNL_ARG_DST_LAYER, wrap(d.dst_layer, y->untyped_data())},
        {DNNL_ARG_DST_ITER, wrap(d.dst_iter, hT->untyped_data())},
        {DNNL_ARG_DST_ITER_C, wrap(d.dst_iter_c, cT->untyped_data())},
        {DNNL_ARG_SCRATCHPAD, scratchpad(f.pd.scratchpad_desc())},
    };
    if (s.peep) args[DNNL_ARG_WEIGHTS_PEEPHOLE] = wrap(d.w_peep, peep.untyped_data());
    std::unique_ptr<Operand> wp;
    if (s.proj) {
      wp.reset(new Operand(d.w_proj, f.pd.weights_projection_desc(), w_proj.untyped_data()));
      wp->to_prim(st);
      args[DNNL_ARG_WEIGHTS_PROJECTION] = wp->prim;
    }
    if (training) {
      if (workspace->size_bytes() < f.pd.workspace_desc().get_size())
        throw std::runtime_error("workspace buffer smaller than oneDNN's workspace");
      args[DNNL_ARG_WORKSPACE] = memory(f.pd.workspace_desc(), cpu_engine(), workspace->untyped_data());
    }
    f.prim.execute(st, args);
    st.wait();
  });
}

ffi::Error LstmBackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                            ffi::Buffer<ffi::F32> w_x, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> b,
                            ffi::Buffer<ffi::F32> peep, ffi::Buffer<ffi::F32> w_proj, ffi::Buffer<ffi::F32> y,
                            ffi::Buffer<ffi::F32> hT, ffi::Buffer<ffi::F32> cT, ffi::Buffer<ffi::U8> workspace,
                            ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> dhT, ffi::Buffer<ffi::F32> dcT,
                            ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dh0,
                            ffi::ResultBuffer<ffi::F32> dc0, ffi::ResultBuffer<ffi::F32> dw_x,
                            ffi::ResultBuffer<ffi::F32> dw_h, ffi::ResultBuffer<ffi::F32> db,
                            ffi::ResultBuffer<ffi::F32> dpeep, ffi::ResultBuffer<ffi::F32> dw_proj, bool reverse) {
  return guarded([&] {
    Shape s = shape_of(x, c0, w_h, peep, w_proj, reverse);
    const Backward& bw = backward(s);
    Descs d(s, false);
    dnnl::stream st(cpu_engine());
    Operand wl(d.w_layer, bw.pd.weights_layer_desc(), w_x.untyped_data());
    Operand wi(d.w_iter, bw.pd.weights_iter_desc(), w_h.untyped_data());
    Operand dwl(d.w_layer, bw.pd.diff_weights_layer_desc(), dw_x->untyped_data());
    Operand dwi(d.w_iter, bw.pd.diff_weights_iter_desc(), dw_h->untyped_data());
    wl.to_prim(st);
    wi.to_prim(st);
    // oneDNN accumulates into the weight gradients
    std::memset(dwl.prim.get_data_handle(), 0, dwl.prim.get_desc().get_size());
    std::memset(dwi.prim.get_data_handle(), 0, dwi.prim.get_desc().get_size());
    std::memset(db->untyped_data(), 0, db->size_bytes());
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC_LAYER, wrap(d.src_layer, x.untyped_data())},
        {DNNL_ARG_SRC_ITER, wrap(d.src_iter, h0.untyped_data())},
        {DNNL_ARG_SRC_ITER_C, wrap(d.src_iter_c, c0.untyped_data())},
        {DNNL_ARG_WEIGHTS_LAYER, wl.prim},
        {DNNL_ARG_WEIGHTS_ITER, wi.prim},
        {DNNL_ARG_BIAS, wrap(d.bias, b.untyped_data())},
        {DNNL_ARG_DST_LAYER, wrap(d.dst_layer, y.untyped_data())},
        {DNNL_ARG_DST_ITER, wrap(d.dst_iter, hT.untyped_data())},
        {DNNL_ARG_DST_ITER_C, wrap(d.dst_iter_c, cT.untyped_data())},
        {DNNL_ARG_WORKSPACE, memory(bw.pd.workspace_desc(), cpu_engine(), workspace.untyped_data())},
        {DNNL_ARG_DIFF_DST_LAYER, wrap(d.dst_layer, dy.untyped_data())},
        {DNNL_ARG_DIFF_DST_ITER, wrap(d.dst_iter, dhT.untyped_data())},
        {DNNL_ARG_DIFF_DST_ITER_C, wrap(d.dst_iter_c, dcT.untyped_data())},
        {DNNL_ARG_DIFF_SRC_LAYER, wrap(d.src_layer, dx->untyped_data())},
        {DNNL_ARG_DIFF_SRC_ITER, wrap(d.src_iter, dh0->untyped_data())},
        {DNNL_ARG_DIFF_SRC_ITER_C, wrap(d.src_iter_c, dc0->untyped_data())},
        {DNNL_ARG_DIFF_WEIGHTS_LAYER, dwl.prim},
        {DNNL_ARG_DIFF_WEIGHTS_ITER, dwi.prim},
        {DNNL_ARG_DIFF_BIAS, wrap(d.bias, db->untyped_data())},
        {DNNL_ARG_SCRATCHPAD, scratchpad(bw.pd.scratchpad_desc())},
    };
    if (s.peep) {
      std::memset(dpeep->untyped_data(), 0, dpeep->size_bytes());
      args[DNNL_ARG_WEIGHTS_PEEPHOLE] = wrap(d.w_peep, peep.untyped_data());
      args[DNNL_ARG_DIFF_WEIGHTS_PEEPHOLE] = wrap(d.w_peep, dpeep->untyped_data());
    }
    std::unique_ptr<Operand> wp, dwp;
    if (s.proj) {
      wp.reset(new Operand(d.w_proj, bw.pd.weights_projection_desc(), w_proj.untyped_data()));
      dwp.reset(new Operand(d.w_proj, bw.pd.diff_weights_projection_desc(), dw_proj->untyped_data()));
      wp->to_prim(st);
      std::memset(dwp->prim.get_data_handle(), 0, dwp->prim.get_desc().get_size());
      args[DNNL_ARG_WEIGHTS_PROJECTION] = wp->prim;
      args[DNNL_ARG_DIFF_WEIGHTS_PROJECTION] = dwp->prim;
    }
    bw.prim.execute(st, args);
    dwl.to_user(st);
    dwi.to_user(st);
    if (dwp) dwp->to_user(st);
    st.wait();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxOnednnLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // peep
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_proj
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hT
                                  .Ret<ffi::Buffer<ffi::F32>>()  // cT
                                  .Ret<ffi::Buffer<ffi::U8>>()   // workspace
                                  .Attr<bool>("training")
                                  .Attr<bool>("reverse"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxOnednnLstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // peep
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_proj
                                  .Arg<ffi::Buffer<ffi::F32>>()  // y
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hT
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cT
                                  .Arg<ffi::Buffer<ffi::U8>>()   // workspace
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dhT
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dcT
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dc0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_x
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_h
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dpeep
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_proj
                                  .Attr<bool>("reverse"));

// The workspace bytes the forward_training primitive of this shape writes, or -1 if oneDNN rejects
// the shape (the message, if any, is copied to ``error``). Called through ctypes at trace time.
extern "C" int64_t seqjax_onednn_lstm_workspace_bytes(int64_t T, int64_t N, int64_t I, int64_t H, int64_t P,
                                                      int peep, int proj, int reverse, char* error,
                                                      int64_t error_len) {
  try {
    Shape s{T, N, I, H, P, peep != 0, proj != 0, reverse != 0};
    forward(s, false);
    backward(s);
    return static_cast<int64_t>(forward(s, true).pd.workspace_desc().get_size());
  } catch (const std::exception& e) {
    if (error && error_len > 0) {
      std::strncpy(error, e.what(), error_len - 1);
      error[error_len - 1] = '\0';
    }
    return -1;
  }
}

extern "C" const char* seqjax_onednn_version() {
  static std::string v;
  const dnnl_version_t* ver = dnnl_version();
  v = std::to_string(ver->major) + "." + std::to_string(ver->minor) + "." + std::to_string(ver->patch);
  return v.c_str();
}
