// oneDNN's fused RNN primitives (forward and backward) as XLA FFI handlers for seqjax.onednn:
// the LSTM (optionally with peepholes and projection), the GRU in both forms and the Elman RNN.
//
// Layouts are oneDNN's user formats, which seqjax.onednn packs the params into: x [T, N, I]
// time-major, h [N, P], c [N, H] (LSTM only), w_x [I, G*H] and w_h [P, G*H] with G gate blocks in
// oneDNN's order (ldigo), b [B*H] (ldgo, B bias blocks), peep [3, H] (rows i, f, o; ldgo),
// w_proj [H, P] (ldio). P = H without projection. Absent operands (c for the GRU and RNN, peep,
// w_proj) are zero-size buffers. The attribute ``cell`` picks the primitive (`Cell`). All float32.
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
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;

namespace {

// Must match seqjax.onednn's _CELLS.
enum Cell : int64_t { kLstm = 0, kGru = 1, kGruCho = 2, kRnnTanh = 3, kRnnRelu = 4 };

int64_t gate_blocks(int64_t cell) { return cell == kLstm ? 4 : (cell == kGru || cell == kGruCho) ? 3 : 1; }
int64_t bias_blocks(int64_t cell) { return cell == kGru ? 4 : gate_blocks(cell); }  // lbr GRU: + b_hn

struct Shape {
  int64_t cell, T, N, I, H, P;
  bool peep, proj, reverse;
  auto key() const { return std::make_tuple(cell, T, N, I, H, P, peep, proj, reverse); }
  bool operator<(const Shape& o) const { return key() < o.key(); }
  bool lstm() const { return cell == kLstm; }
};

dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

memory::desc f32(memory::dims dims, tag t) { return memory::desc(dims, memory::data_type::f32, t); }

// The user-layout descriptors of one shape; ``any`` replaces the weights' layouts for oneDNN to choose.
// Descriptors of absent operands are empty (zero) descriptors.
struct Descs {
  memory::desc src_layer, src_iter, src_iter_c, w_layer, w_iter, w_peep, w_proj, bias, dst_layer, dst_iter,
      dst_iter_c;
  Descs(const Shape& s, bool any) {
    tag wt = any ? tag::any : tag::ldigo;
    int64_t G = gate_blocks(s.cell);
    src_layer = f32({s.T, s.N, s.I}, tag::tnc);
    src_iter = f32({1, 1, s.N, s.P}, tag::ldnc);
    src_iter_c = s.lstm() ? f32({1, 1, s.N, s.H}, tag::ldnc) : memory::desc();
    w_layer = f32({1, 1, s.I, G, s.H}, wt);
    w_iter = f32({1, 1, s.P, G, s.H}, wt);
    w_peep = s.peep ? f32({1, 1, 3, s.H}, tag::ldgo) : memory::desc();
    w_proj = s.proj ? f32({1, 1, s.H, s.P}, any ? tag::any : tag::ldio) : memory::desc();
    bias = f32({1, 1, bias_blocks(s.cell), s.H}, tag::ldgo);
    dst_layer = f32({s.T, s.N, s.P}, tag::tnc);
    dst_iter = f32({1, 1, s.N, s.P}, tag::ldnc);
    dst_iter_c = src_iter_c;
  }
};

dnnl::rnn_direction direction(const Shape& s) {
  return s.reverse ? dnnl::rnn_direction::unidirectional_right2left
                   : dnnl::rnn_direction::unidirectional_left2right;
}

// The primitives take their scratchpad from the caller (`scratchpad`). With oneDNN's own
// (library-mode) scratchpad the forward-training LSTM crashed in copy_bias_to_ws when it ran on an
// XLA worker thread rather than the thread that created it.
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

dnnl::algorithm activation(const Shape& s) {
  return s.cell == kRnnRelu ? dnnl::algorithm::eltwise_relu : dnnl::algorithm::eltwise_tanh;
}

struct Primitive {
  dnnl::rnn_primitive_desc_base pd;
  dnnl::primitive prim;
};

template <typename Fwd>
Primitive make_forward(const typename Fwd::primitive_desc& pd) { return {pd, Fwd(pd)}; }

Primitive build_forward(const Shape& s, dnnl::prop_kind kind) {
  Descs d(s, true);
  auto& e = cpu_engine();
  auto dir = direction(s);
  auto attr = user_scratchpad();
  switch (s.cell) {
    case kLstm:
      return make_forward<dnnl::lstm_forward>({e, kind, dir, d.src_layer, d.src_iter, d.src_iter_c, d.w_layer,
                                               d.w_iter, d.w_peep, d.w_proj, d.bias, d.dst_layer, d.dst_iter,
                                               d.dst_iter_c, attr});
    case kGru:
      return make_forward<dnnl::lbr_gru_forward>(
          {e, kind, dir, d.src_layer, d.src_iter, d.w_layer, d.w_iter, d.bias, d.dst_layer, d.dst_iter, attr});
    case kGruCho:
      return make_forward<dnnl::gru_forward>(
          {e, kind, dir, d.src_layer, d.src_iter, d.w_layer, d.w_iter, d.bias, d.dst_layer, d.dst_iter, attr});
    default:
      return make_forward<dnnl::vanilla_rnn_forward>({e, kind, activation(s), dir, d.src_layer, d.src_iter,
                                                      d.w_layer, d.w_iter, d.bias, d.dst_layer, d.dst_iter, attr});
  }
}

template <typename Fwd, typename Bwd, typename... Extra>
Primitive make_backward(const Shape& s, const Descs& d, Extra... head) {
  typename Fwd::primitive_desc hint(cpu_engine(), dnnl::prop_kind::forward_training, head..., direction(s),
                                    d.src_layer, d.src_iter, d.w_layer, d.w_iter, d.bias, d.dst_layer, d.dst_iter,
                                    user_scratchpad());
  typename Bwd::primitive_desc pd(cpu_engine(), dnnl::prop_kind::backward, head..., direction(s), d.src_layer,
                                  d.src_iter, d.w_layer, d.w_iter, d.bias, d.dst_layer, d.dst_iter, d.src_layer,
                                  d.src_iter, d.w_layer, d.w_iter, d.bias, d.dst_layer, d.dst_iter, hint,
                                  user_scratchpad());
  return {pd, Bwd(pd)};
}

Primitive build_backward(const Shape& s) {
  Descs d(s, true);
  switch (s.cell) {
    case kLstm: {
      dnnl::lstm_forward::primitive_desc hint(cpu_engine(), dnnl::prop_kind::forward_training, direction(s),
                                              d.src_layer, d.src_iter, d.src_iter_c, d.w_layer, d.w_iter, d.w_peep,
                                              d.w_proj, d.bias, d.dst_layer, d.dst_iter, d.dst_iter_c,
                                              user_scratchpad());
      dnnl::lstm_backward::primitive_desc pd(
          cpu_engine(), dnnl::prop_kind::backward, direction(s), d.src_layer, d.src_iter, d.src_iter_c, d.w_layer,
          d.w_iter, d.w_peep, d.w_proj, d.bias, d.dst_layer, d.dst_iter, d.dst_iter_c, d.src_layer, d.src_iter,
          d.src_iter_c, d.w_layer, d.w_iter, d.w_peep, d.w_proj, d.bias, d.dst_layer, d.dst_iter, d.dst_iter_c,
          hint, user_scratchpad());
      return {pd, dnnl::lstm_backward(pd)};
    }
    case kGru:
      return make_backward<dnnl::lbr_gru_forward, dnnl::lbr_gru_backward>(s, d);
    case kGruCho:
      return make_backward<dnnl::gru_forward, dnnl::gru_backward>(s, d);
    default:
      return make_backward<dnnl::vanilla_rnn_forward, dnnl::vanilla_rnn_backward>(s, d, activation(s));
  }
}

std::mutex cache_mutex;

// 0: forward_inference, 1: forward_training (writes the workspace the backward reads), 2: backward.
const Primitive& primitive(const Shape& s, int stage) {
  static std::map<std::pair<Shape, int>, std::unique_ptr<Primitive>> cache;
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto& slot = cache[{s, stage}];
  if (!slot) {
    slot.reset(new Primitive(stage == 2 ? build_backward(s)
                                        : build_forward(s, stage == 1 ? dnnl::prop_kind::forward_training
                                                                      : dnnl::prop_kind::forward_inference)));
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

Shape shape_of(int64_t cell, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w_h, ffi::Buffer<ffi::F32>& peep,
               ffi::Buffer<ffi::F32>& w_proj, bool reverse) {
  auto xd = x.dimensions(), wd = w_h.dimensions();
  bool proj = w_proj.element_count() > 0;
  int64_t H = wd[1] / gate_blocks(cell);
  return Shape{cell, xd[0], xd[1], xd[2], H, wd[0], peep.element_count() > 0, proj, reverse};
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

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

// The arguments forward and backward both pass: the inputs, the weights reordered into the
// primitive's layout (the memory handles in ``args`` keep those buffers alive), the forward's outputs
// (written by the forward, read by the backward) and the scratchpad.
struct Args {
  Descs d;
  std::unordered_map<int, memory> args;

  Args(const Shape& s, const dnnl::rnn_primitive_desc_base& pd, dnnl::stream& st, void* x, void* h0, void* c0,
       void* w_x, void* w_h, void* b, void* peep, void* w_proj, void* y, void* hT, void* cT)
      : d(s, false) {
    args = {
        {DNNL_ARG_SRC_LAYER, wrap(d.src_layer, x)},
        {DNNL_ARG_SRC_ITER, wrap(d.src_iter, h0)},
        {DNNL_ARG_BIAS, wrap(d.bias, b)},
        {DNNL_ARG_DST_LAYER, wrap(d.dst_layer, y)},
        {DNNL_ARG_DST_ITER, wrap(d.dst_iter, hT)},
        {DNNL_ARG_SCRATCHPAD, scratchpad(pd.scratchpad_desc())},
    };
    weight(st, DNNL_ARG_WEIGHTS_LAYER, d.w_layer, pd.weights_layer_desc(), w_x);
    weight(st, DNNL_ARG_WEIGHTS_ITER, d.w_iter, pd.weights_iter_desc(), w_h);
    if (s.lstm()) {
      args[DNNL_ARG_SRC_ITER_C] = wrap(d.src_iter_c, c0);
      args[DNNL_ARG_DST_ITER_C] = wrap(d.dst_iter_c, cT);
    }
    if (s.peep) args[DNNL_ARG_WEIGHTS_PEEPHOLE] = wrap(d.w_peep, peep);
    if (s.proj) weight(st, DNNL_ARG_WEIGHTS_PROJECTION, d.w_proj, pd.weights_projection_desc(), w_proj);
  }

 private:
  void weight(dnnl::stream& st, int arg, const memory::desc& user, const memory::desc& prim, void* data) {
    Operand w(user, prim, data);
    w.to_prim(st);
    args[arg] = w.prim;
  }
};

// A weight gradient: zeroed (oneDNN accumulates into it), in the primitive's layout.
Operand zeroed_gradient(const memory::desc& user, const memory::desc& prim, void* data) {
  Operand g(user, prim, data);
  std::memset(g.prim.get_data_handle(), 0, g.prim.get_desc().get_size());
  return g;
}

ffi::Error ForwardImpl(F32 x, F32 h0, F32 c0, F32 w_x, F32 w_h, F32 b, F32 peep, F32 w_proj, F32Out y, F32Out hT,
                       F32Out cT, ffi::ResultBuffer<ffi::U8> workspace, int64_t cell, bool training, bool reverse) {
  return guarded([&] {
    Shape s = shape_of(cell, x, w_h, peep, w_proj, reverse);
    const Primitive& f = primitive(s, training ? 1 : 0);
    dnnl::stream st(cpu_engine());
    Args a(s, f.pd, st, x.untyped_data(), h0.untyped_data(), c0.untyped_data(), w_x.untyped_data(),
           w_h.untyped_data(), b.untyped_data(), peep.untyped_data(), w_proj.untyped_data(), y->untyped_data(),
           hT->untyped_data(), cT->untyped_data());
    if (training) {
      if (workspace->size_bytes() < f.pd.workspace_desc().get_size())
        throw std::runtime_error("workspace buffer smaller than oneDNN's workspace");
      a.args[DNNL_ARG_WORKSPACE] = memory(f.pd.workspace_desc(), cpu_engine(), workspace->untyped_data());
    }
    f.prim.execute(st, a.args);
    st.wait();
  });
}

ffi::Error BackwardImpl(F32 x, F32 h0, F32 c0, F32 w_x, F32 w_h, F32 b, F32 peep, F32 w_proj, F32 y, F32 hT, F32 cT,
                        ffi::Buffer<ffi::U8> workspace, F32 dy, F32 dhT, F32 dcT, F32Out dx, F32Out dh0, F32Out dc0,
                        F32Out dw_x, F32Out dw_h, F32Out db, F32Out dpeep, F32Out dw_proj, int64_t cell,
                        bool reverse) {
  return guarded([&] {
    Shape s = shape_of(cell, x, w_h, peep, w_proj, reverse);
    const Primitive& bw = primitive(s, 2);
    dnnl::stream st(cpu_engine());
    Args a(s, bw.pd, st, x.untyped_data(), h0.untyped_data(), c0.untyped_data(), w_x.untyped_data(),
           w_h.untyped_data(), b.untyped_data(), peep.untyped_data(), w_proj.untyped_data(), y.untyped_data(),
           hT.untyped_data(), cT.untyped_data());
    const Descs& d = a.d;
    auto& args = a.args;
    Operand dwl = zeroed_gradient(d.w_layer, bw.pd.diff_weights_layer_desc(), dw_x->untyped_data());
    Operand dwi = zeroed_gradient(d.w_iter, bw.pd.diff_weights_iter_desc(), dw_h->untyped_data());
    std::memset(db->untyped_data(), 0, db->size_bytes());
    args[DNNL_ARG_WORKSPACE] = memory(bw.pd.workspace_desc(), cpu_engine(), workspace.untyped_data());
    args[DNNL_ARG_DIFF_DST_LAYER] = wrap(d.dst_layer, dy.untyped_data());
    args[DNNL_ARG_DIFF_DST_ITER] = wrap(d.dst_iter, dhT.untyped_data());
    args[DNNL_ARG_DIFF_SRC_LAYER] = wrap(d.src_layer, dx->untyped_data());
    args[DNNL_ARG_DIFF_SRC_ITER] = wrap(d.src_iter, dh0->untyped_data());
    args[DNNL_ARG_DIFF_WEIGHTS_LAYER] = dwl.prim;
    args[DNNL_ARG_DIFF_WEIGHTS_ITER] = dwi.prim;
    args[DNNL_ARG_DIFF_BIAS] = wrap(d.bias, db->untyped_data());
    if (s.lstm()) {
      args[DNNL_ARG_DIFF_DST_ITER_C] = wrap(d.dst_iter_c, dcT.untyped_data());
      args[DNNL_ARG_DIFF_SRC_ITER_C] = wrap(d.src_iter_c, dc0->untyped_data());
    }
    if (s.peep) {
      std::memset(dpeep->untyped_data(), 0, dpeep->size_bytes());
      args[DNNL_ARG_DIFF_WEIGHTS_PEEPHOLE] = wrap(d.w_peep, dpeep->untyped_data());
    }
    std::unique_ptr<Operand> dwp;
    if (s.proj) {
      dwp.reset(new Operand(zeroed_gradient(d.w_proj, bw.pd.diff_weights_projection_desc(),
                                            dw_proj->untyped_data())));
      args[DNNL_ARG_DIFF_WEIGHTS_PROJECTION] = dwp->prim;
    }
    bw.prim.execute(st, args);
    dwl.to_user(st);
    dwi.to_user(st);
    if (dwp) dwp->to_user(st);
    st.wait();
  });
}

// The eight operands both handlers take first: x, h0, c0, w_x, w_h, b, peep, w_proj.
template <typename Binding>
auto with_operands(Binding binding) {
  return std::move(binding).template Arg<F32>().template Arg<F32>().template Arg<F32>().template Arg<F32>()
      .template Arg<F32>().template Arg<F32>().template Arg<F32>().template Arg<F32>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxOnednnRnnForward, ForwardImpl,
                              with_operands(ffi::Ffi::Bind())
                                  .Ret<F32>()                   // y
                                  .Ret<F32>()                   // hT
                                  .Ret<F32>()                   // cT
                                  .Ret<ffi::Buffer<ffi::U8>>()  // workspace
                                  .Attr<int64_t>("cell")
                                  .Attr<bool>("training")
                                  .Attr<bool>("reverse"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxOnednnRnnBackward, BackwardImpl,
                              with_operands(ffi::Ffi::Bind())
                                  .Arg<F32>()                   // y
                                  .Arg<F32>()                   // hT
                                  .Arg<F32>()                   // cT
                                  .Arg<ffi::Buffer<ffi::U8>>()  // workspace
                                  .Arg<F32>()                   // dy
                                  .Arg<F32>()                   // dhT
                                  .Arg<F32>()                   // dcT
                                  .Ret<F32>()                   // dx
                                  .Ret<F32>()                   // dh0
                                  .Ret<F32>()                   // dc0
                                  .Ret<F32>()                   // dw_x
                                  .Ret<F32>()                   // dw_h
                                  .Ret<F32>()                   // db
                                  .Ret<F32>()                   // dpeep
                                  .Ret<F32>()                   // dw_proj
                                  .Attr<int64_t>("cell")
                                  .Attr<bool>("reverse"));

// The workspace bytes the forward_training primitive of this cell and shape writes (building all
// three primitives), or -1 if oneDNN rejects them (the message, if any, is copied to ``error``).
// Called through ctypes at trace time.
extern "C" int64_t seqjax_onednn_workspace_bytes(int64_t cell, int64_t T, int64_t N, int64_t I, int64_t H, int64_t P,
                                                 int peep, int proj, int reverse, char* error, int64_t error_len) {
  try {
    if (cell < kLstm || cell > kRnnRelu) throw std::invalid_argument("unknown cell " + std::to_string(cell));
    Shape s{cell, T, N, I, H, P, peep != 0, proj != 0, reverse != 0};
    primitive(s, 0);
    primitive(s, 2);
    return static_cast<int64_t>(primitive(s, 1).pd.workspace_desc().get_size());
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
