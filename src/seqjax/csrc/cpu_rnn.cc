// Whole recurrences as XLA FFI handlers for x86 CPUs with AVX2 and FMA or AVX-512 (seqjax.avx2): the LSTM
// (with or without peepholes, and Greff et al.'s variants NIG, NFG, NOG, CIFG, NIAF and NOAF), the GRU
// (reset_after, PyTorch's and cuDNN's form) and the tanh/relu Elman RNN, float32, forward and backward. The
// backward handler has the operands and results of seqjax.cuda's (cuda_rnn.cu) and then the masks and the
// peepholes and their per-row gradients; the forward one takes xs, W_x and b where the CUDA one takes
// px = x W_x + b, and computes the projection itself (seqjax.persistent holds the jax.custom_vjp around them). A third handler, WeightGrads, computes dW_x,
// dW_h and the bias gradients from the backward's dpx as one GEMM over all T*B rows (XLA computes dxs).
//
// Each forward step multiplies [x_t, h_{t-1}] by the packed [W_x; W_h] and applies the gate arithmetic
// while the gate pre-activations are still in registers: a tile is R batch rows x kU hidden units (one
// vector register: 8 with AVX2, 16 with AVX-512) x all G gates, with the weights packed once per call so
// that a unit block's G gate columns are contiguous. Work is split into chunks of kU hidden units; the
// calling thread and (for big enough steps) one helper from XLA's intra-op thread pool claim chunks step by
// step (`Team`), or each take half of the batch through all the steps (`split_rows`). The backward pass
// fuses a chunk's share of dh_{t-1} = dA_t W_h^T with the next step's gate derivatives of the same units,
// so either pass has at most one barrier per step.
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Must match seqjax.persistent's CELLS (seqjax.onednn's numbering; the LSTM variants are these kernels' own).
enum Cell : int64_t { kLstm = 0, kGru = 1, kRnnTanh = 3, kRnnRelu = 4 };
// Greff et al.'s LSTM variants: kLstmVariant | one of these bits (kLstm is the standard LSTM, no bits). Any of
// them, kLstm too, has peepholes where the peep operand is given (p_i, p_f on c_{t-1} and p_o on c_t, one row
// per sigmoid gate that the variant computes, in that order).
enum LstmBits : int64_t {
  kLstmVariant = 64,
  kNoInputGate = 1,     // NIG: i = 1
  kNoForgetGate = 2,    // NFG: f = 1
  kNoOutputGate = 4,    // NOG: o = 1
  kCoupled = 8,         // CIFG: f = 1 - i
  kLinearInput = 16,    // NIAF: g = a_g
  kLinearOutput = 32,   // NOAF: h = o c
};
// The forward pass only: the RNN with two register blocks of units per chunk, u and H/2 + u, as if it had
// two gates of H/2 units (where H/2 is a multiple of kU): a tile's k step loads 2 weight vectors and R
// broadcasts for 2R FMAs instead of 1 and R for R.
enum PairedCell : int64_t { kRnnTanhPair = 5, kRnnReluPair = 6 };
constexpr bool is_pair(int64_t cell) { return cell == kRnnTanhPair || cell == kRnnReluPair; }
constexpr bool is_rnn(int64_t cell) { return cell == kRnnTanh || cell == kRnnRelu || is_pair(cell); }
constexpr bool is_lstm(int64_t cell) { return cell == kLstm || (cell & kLstmVariant); }
constexpr bool lstm_has(int64_t cell, int64_t bits) { return cell != kLstm && (cell & bits); }
// The gates an LSTM variant computes, in column order i, f, g, o; a missing gate is 1 (f: 1 - i for CIFG).
constexpr bool has_i(int64_t cell) { return !lstm_has(cell, kNoInputGate); }
constexpr bool has_f(int64_t cell) { return !lstm_has(cell, kNoForgetGate | kCoupled); }
constexpr bool has_o(int64_t cell) { return !lstm_has(cell, kNoOutputGate); }
constexpr int col_f(int64_t cell) { return has_i(cell); }
constexpr int col_g(int64_t cell) { return has_i(cell) + has_f(cell); }
constexpr int col_o(int64_t cell) { return col_g(cell) + 1; }
// sigmoid gates: the rows of peep, i, f, o as present
constexpr int sigmoid_gates(int64_t cell) { return has_i(cell) + has_f(cell) + has_o(cell); }
constexpr int gates_of(int64_t cell) {
  return is_lstm(cell) ? sigmoid_gates(cell) + 1 : cell == kGru ? 3 : is_pair(cell) ? 2 : 1;
}

// ------------------------------------------------------------------------------------ vector math
// One source, two builds (seqjax.native): AVX2 + FMA (8 floats per register, 16 registers) and, with
// SEQJAX_AVX512 defined, AVX-512F (16 floats, 32 registers). The kernels below use only these names.

#if defined(SEQJAX_AVX512)
using vec = __m512;
constexpr int kU = 16;     // hidden units per chunk: one vector register
constexpr int kRegs = 32;  // vector registers
inline vec v(float x) { return _mm512_set1_ps(x); }
inline vec ld(const float* p) { return _mm512_loadu_ps(p); }
inline void st(float* p, vec x) { _mm512_storeu_ps(p, x); }
inline vec bcast(const float* p) { return _mm512_set1_ps(*p); }
inline vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec div(vec a, vec b) { return _mm512_div_ps(a, b); }
inline vec min(vec a, vec b) { return _mm512_min_ps(a, b); }
inline vec max(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec zero() { return _mm512_setzero_ps(); }
// x where y > 0, else +0 (the relu's backward from its output y: a select, as XLA's, so that a NaN or Inf in x
// does not pass where y <= 0 or y is NaN)
inline vec where_positive(vec y, vec x) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, zero(), _CMP_GT_OQ), x); }
// relu: x where x > 0 or x is NaN, else +0 (XLA's max(x, 0): NaN stays NaN, -0 gives +0)
inline vec relu(vec x) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, zero(), _CMP_NLE_UQ), x); }
#else
using vec = __m256;
constexpr int kU = 8;
constexpr int kRegs = 16;
inline vec v(float x) { return _mm256_set1_ps(x); }
inline vec ld(const float* p) { return _mm256_loadu_ps(p); }
inline void st(float* p, vec x) { _mm256_storeu_ps(p, x); }
inline vec bcast(const float* p) { return _mm256_broadcast_ss(p); }
inline vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec div(vec a, vec b) { return _mm256_div_ps(a, b); }
inline vec min(vec a, vec b) { return _mm256_min_ps(a, b); }
inline vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec zero() { return _mm256_setzero_ps(); }
inline vec where_positive(vec y, vec x) { return _mm256_and_ps(_mm256_cmp_ps(y, zero(), _CMP_GT_OQ), x); }
inline vec relu(vec x) { return _mm256_and_ps(_mm256_cmp_ps(x, zero(), _CMP_NLE_UQ), x); }
#endif

// tanh: Eigen's 13/6 rational minimax approximation, a few ulp over the whole range, evaluated as XLA:CPU
// evaluates it for float32 with FMA (xla/codegen/intrinsic/tanh.cc: the same FMAs, product and division), so
// that it gives XLA's bits wherever |x| >= 0.0004 (below, XLA returns x and this x p/q, within 3 ulp of it for
// |x| >= 1e-36; the select that would match it there cost ~1-2 % of the forward pass). The input is
// clamped to +-7.99881172180175781, XLA's bound with FMA, where the approximation gives exactly +-1: from
// there on (and at +-Inf) tanh is exactly +-1 and its derivative 1 - y^2 exactly 0, as XLA's. min and max
// return their second operand where either is NaN, so with x second a NaN passes through both (and the
// arithmetic after) as NaN.
inline vec tanhv(vec x) {
  x = min(v(7.99881172180175781f), max(v(-7.99881172180175781f), x));
  const vec x2 = mul(x, x);
  vec p = v(-2.76076847742355e-16f);
  p = fmadd(p, x2, v(2.00018790482477e-13f));
  p = fmadd(p, x2, v(-8.60467152213735e-11f));
  p = fmadd(p, x2, v(5.12229709037114e-08f));
  p = fmadd(p, x2, v(1.48572235717979e-05f));
  p = fmadd(p, x2, v(6.37261928875436e-04f));
  p = fmadd(p, x2, v(4.89352455891786e-03f));
  vec q = v(1.19825839466702e-06f);
  q = fmadd(q, x2, v(1.18534705686654e-04f));
  q = fmadd(q, x2, v(2.26843463243900e-03f));
  q = fmadd(q, x2, v(4.89352518554385e-03f));
  return div(mul(x, p), q);
}

// sigmoid(x) = (1 + tanh(x / 2)) / 2: one division, absolute error under 2e-7 (XLA's is 1 / (1 + exp(-x))).
// NaN gives NaN, +Inf 1 and -Inf 0; exactly 1 for x >= 15.9977 (XLA's for x >= 16.636) and exactly 0 for
// x <= -15.9977 (XLA's for x <= -87.34, where it flushes e^x to zero; between, XLA's is about e^x <= 1.1e-7).
inline vec sigmoidv(vec x) { return fmadd(tanhv(mul(x, v(0.5f))), v(0.5f), v(0.5f)); }

inline vec one_minus(vec x) { return sub(v(1.f), x); }

// ---------------------------------------------------------------------------------- the thread team

// Runs `steps` steps of `chunks` chunks each, in order: every chunk of step s finishes before any chunk
// of step s + 1 starts. The calling thread claims chunks from the front (0, 1, ...) and `helpers` tasks
// scheduled on XLA's intra-op pool claim them from the back (chunks - 1, ...), so with one helper each
// thread keeps to the same chunks, and their weights in its own caches, step after step, while the split
// still follows whichever thread runs faster. A helper that starts late (a busy pool) just joins in, and one
// that never starts costs nothing.
class Team {
 public:
  using Work = std::function<void(int step, int chunk)>;

  static void run(int steps, int chunks, int helpers, ffi::ThreadPool* pool, const Work& work) {
    if (helpers <= 0 || pool == nullptr || pool->num_threads() <= 0) {
      for (int s = 0; s < steps; ++s)
        for (int c = 0; c < chunks; ++c) work(s, c);
      return;
    }
    auto state = std::make_shared<State>();
    state->work = &work;
    state->chunks = chunks;
    for (int i = 0; i < helpers; ++i) pool->Schedule([state] { state->help(); });
    for (int s = 0; s < steps; ++s) {
      state->step.store(s, std::memory_order_relaxed);
      state->next.store(0, std::memory_order_release);
      state->claim_all(false);
      const int64_t target = static_cast<int64_t>(s + 1) * chunks;
      for (int spins = 0; state->done.load(std::memory_order_acquire) < target; ++spins) pause(spins);
    }
    state->next.store(kFull, std::memory_order_release);
    state->stop.store(true, std::memory_order_release);
    // a helper that claimed nothing may still be reading `next`; it holds `state`, not `work`
  }

 private:
  static constexpr int kShift = 24;
  static constexpr int64_t kMask = (int64_t{1} << kShift) - 1;
  static constexpr int64_t kFull = kMask << kShift;

  static void pause(int spins) {
    if (spins < 4096) {
      _mm_pause();
    } else {
      std::this_thread::yield();  // an oversubscribed machine: let the thread we wait for run
    }
  }

  struct State {
    const Work* work = nullptr;
    int chunks = 0;
    // each on its own cache line: the threads write them at every claim
    alignas(64) std::atomic<int64_t> next{kFull};  // (chunks claimed from the front << kShift) | from the back
    alignas(64) std::atomic<int64_t> done{0};      // chunks finished, all steps
    alignas(64) std::atomic<int> step{0};          // the step being claimed: set before `next` is reset
    alignas(64) std::atomic<bool> stop{false};

    static bool open(int64_t got, int chunks) { return (got >> kShift) + (got & kMask) < chunks; }

    // Claims chunks until none of the step is left (compare-and-swap on both counts, so the two ends never
    // claim the same chunk). A successful claim holds the step open, so `step` read after it is its step.
    void claim_all(bool back) {
      int64_t got = next.load(std::memory_order_acquire);
      for (;;) {
        if (!open(got, chunks)) return;
        const int64_t want = back ? got + 1 : got + (int64_t{1} << kShift);
        if (!next.compare_exchange_weak(got, want, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
        const int chunk = back ? chunks - 1 - static_cast<int>(got & kMask) : static_cast<int>(got >> kShift);
        (*work)(step.load(std::memory_order_relaxed), chunk);
        done.fetch_add(1, std::memory_order_acq_rel);
        got = next.load(std::memory_order_acquire);
      }
    }

    void help() {
      for (int spins = 0; !stop.load(std::memory_order_acquire); ++spins) {
        if (open(next.load(std::memory_order_acquire), chunks)) {
          claim_all(true);
          spins = 0;
        } else {
          pause(spins);
        }
      }
    }
  };
};

// ------------------------------------------------------------------------------------------ layout

// Where (step t, batch row b) is among the rows of the sequence arrays (xs, ys, act, aux, dys, dpx, dghn):
// time-major [T, B, .] or batch-major [B, T, .] (the batch_major attribute; seqjax.scan's default layout,
// taken as it comes so that XLA transposes nothing).
struct Rows {
  int T, B;
  bool batch_major;
  size_t at(int t, int b) const {
    return batch_major ? static_cast<size_t>(b) * T + t : static_cast<size_t>(t) * B + b;
  }
  size_t batch_step() const { return batch_major ? T : 1; }  // rows between (t, b) and (t, b + 1)
};

// seqjax.scan's lengths and resets. Step t of batch row b is valid where t < len[b]: past its length a
// sequence's carry stays as it is and its outputs are zero, in both directions (reverse then starts each
// sequence at its own last valid step). Where a valid step has resets[t][b] the carry is set back to zero
// before the step; a reset at a padding step does nothing, since the carry passes it unchanged.
//
// The forward and backward passes take the batch rows in the order `order` gives (slot -> batch row; null:
// as they are): longest sequence first, so that the tiles of rows that are all padding come together and
// skip their work. Their own buffers (h, c and their gradients) hold the rows by slot; the methods below take
// slots, and `phys` finds the row of the sequence arrays. Each row's arithmetic is the same in any slot.
struct Masks {
  const int32_t* len;    // [B], or null: every step is valid
  const bool* resets;    // [T, B] (time-major whatever the layout of the sequence arrays), or null: none
  int T, B;
  const int* order = nullptr;  // [B]: the batch row in each slot, or null: slot b is row b
  int phys(int b) const { return order ? order[b] : b; }
  bool active(int t, int b) const { return !len || t < len[phys(b)]; }
  bool reset(int t, int b) const {
    return resets && t >= 0 && t < T && resets[static_cast<size_t>(t) * B + phys(b)] && active(t, b);
  }
  // whether no gradient passes from step t to the carry before it through the step's gates (padding or a reset)
  bool cut(int t, int b) const { return !active(t, b) || reset(t, b); }
  // whether rows b0 .. b0+rows-1 are all padding at step t (false without lengths)
  bool padding_only(int t, int b0, int rows) const {
    if (!len) return false;
    for (int b = b0; b < b0 + rows; ++b)
      if (active(t, b)) return false;
    return true;
  }
};

// ----------------------------------------------------------------------------------------- forward

struct ForwardArgs {
  const float* xs;    // [T, B, I] or [B, T, I] (`rows`)
  const float* b;     // [G*H]: the bias of the gates' pre-activations
  const float* b_hn;  // [H] (GRU) or null
  const float* peep;  // [S][H] (LSTM with peepholes): p_i, p_f on c_{t-1} and p_o on c_t as present, or null
  const float* h0;    // [B, H], by slot
  float* ys;          // [T, B, H] or [B, T, H]
  float* c;           // [B, H] (LSTM), by slot: c_{t-1}, updated in place, or null
  float* act;         // [T, B, G*H] or [B, T, G*H]: the activated gates (training), or null
  float* aux;         // as ys: LSTM: c_t, GRU: h_{t-1} W_hn + b_hn (training), or null
  const float* wx;    // packed W_x: [H/kU][I][G][kU], unit block, input feature, gate, unit
  const float* wh;    // packed W_h: [H/kU][H][G][kU]
  float* hs;          // [2][B, H]: h_t of the last two steps, contiguous whatever the layout of ys
  Masks mask;
  int T, B, I, H;
  bool reverse;
  Rows rows;
};

// acc[r][gate(g)] += sum_k in[r][k] w[k][g] for R rows of `in`, K inputs, G gates (w: [K][G][kU]).
// Row r's value at k is in[r * stride + k * KS].
template <int R, int G, int KS = 1, int A, typename Gate>
inline void accumulate(vec (&acc)[R][A], const float* in, int stride, const float* w, int K, Gate gate) {
  // Register budget (kRegs): the accumulators plus either all G weight vectors and one broadcast, or all R
  // broadcasts and one weight vector, whichever fits.
  constexpr bool weights_first = R * A + G + 1 <= kRegs;
  for (int k = 0; k < K; ++k, w += G * kU) {
    if constexpr (weights_first) {
      vec wk[G];
#pragma GCC unroll 16
      for (int g = 0; g < G; ++g) wk[g] = ld(w + g * kU);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const vec xk = bcast(in + r * stride + k * KS);
#pragma GCC unroll 16
        for (int g = 0; g < G; ++g) acc[r][gate(g)] = fmadd(xk, wk[g], acc[r][gate(g)]);
      }
    } else {
      vec xk[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) xk[r] = bcast(in + r * stride + k * KS);
#pragma GCC unroll 16
      for (int g = 0; g < G; ++g) {
        const vec wk = ld(w + g * kU);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) acc[r][gate(g)] = fmadd(xk[r], wk, acc[r][gate(g)]);
      }
    }
  }
}

// Row b's units u .. u+kU-1 (of each of the paired RNN's halves) at a padding step: h (and c) stay and y = 0.
// act and aux are left unwritten: nothing reads them at padding steps.
template <int CELL>
inline void pad_row(const ForwardArgs& a, int t, const float* hprev, float* hn, int b, int u) {
  const int GS = is_pair(CELL) ? a.H / 2 : a.H;
  const size_t row = a.rows.at(t, a.mask.phys(b));
  const bool reset = a.mask.reset(a.reverse ? t - 1 : t + 1, b);  // the next step starts from zero
  for (int g = 0; g < (is_pair(CELL) ? 2 : 1); ++g) {
    const int o = g * GS + u;
    st(a.ys + row * a.H + o, zero());
    st(hn + static_cast<size_t>(b) * a.H + o, reset ? zero() : ld(hprev + o));
  }
  if (is_lstm(CELL) && reset) st(a.c + static_cast<size_t>(b) * a.H + u, zero());
}

// Rows b0 .. b0+R-1 of step t, units u .. u+kU-1 of each gate (gates GS units apart), inputs k0 .. k1-1 of
// [x_t, h_{t-1}]: h_t = cell(x_t W_x + b, h_{t-1} W_h) once k1 = I + H. Before that the accumulators go to
// `save` ([R][A][kU]) and the next block of inputs picks them up. The GRU keeps a fourth accumulator,
// x_t W_xn + b_n, apart from h_{t-1} W_hn + b_hn, which its reset gate scales.
template <int CELL, int R>
void forward_tile(const ForwardArgs& a, int t, const float* hp, float* hn, int b0, int u, int k0, int k1, float* save,
                  const float* x, size_t x_stride) {
  constexpr int G = gates_of(CELL), A = CELL == kGru ? 4 : G;
  const int H = a.H, I = a.I, GH = G * H, GS = is_pair(CELL) ? H / 2 : H;
  if (a.mask.padding_only(t, b0, R)) {  // skip the products (sorting a batch by length makes more such tiles)
    if (k1 == I + H)
      for (int r = 0; r < R; ++r) pad_row<CELL>(a, t, hp + static_cast<size_t>(b0 + r) * H, hn, b0 + r, u);
    return;
  }
  vec acc[R][A];
  if (k0 == 0) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
      for (int g = 0; g < G; ++g) acc[r][g] = ld(a.b + g * GS + u);
      if constexpr (CELL == kGru) acc[r][3] = acc[r][2], acc[r][2] = ld(a.b_hn + u);
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int g = 0; g < A; ++g) acc[r][g] = ld(save + (r * A + g) * kU);
  }
  const size_t block = u / kU;
  if (k0 < I) {
    const int k = std::min(k1, I);
    accumulate<R, G>(acc, x + k0, static_cast<int>(x_stride), a.wx + (block * I + k0) * G * kU, k - k0,
                     [](int g) { return CELL == kGru && g == 2 ? 3 : g; });
  }
  const float* h = hp + static_cast<size_t>(b0) * H;
  if (k1 > I) {
    const int k = std::max(k0, I) - I;
    accumulate<R, G>(acc, h + k, H, a.wh + (block * H + k) * G * kU, k1 - I - k, [](int g) { return g; });
  }
  if (k1 < I + H) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int g = 0; g < A; ++g) st(save + (r * A + g) * kU, acc[r][g]);
    return;
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const size_t row = a.rows.at(t, a.mask.phys(b0 + r));
    if (!a.mask.active(t, b0 + r)) {
      pad_row<CELL>(a, t, h + r * H, hn, b0 + r, u);
      continue;
    }
    // the carried h (and c) of a row whose next step resets is zero; ys (and aux) keep h_t (and c_t)
    const bool reset = a.mask.reset(a.reverse ? t - 1 : t + 1, b0 + r);
    if constexpr (is_rnn(CELL)) {  // G register blocks of units, GS apart
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const vec y = CELL == kRnnTanh || CELL == kRnnTanhPair ? tanhv(acc[r][g]) : relu(acc[r][g]);
        st(a.ys + row * H + g * GS + u, y);
        st(hn + static_cast<size_t>(b0 + r) * H + g * GS + u, reset ? zero() : y);
      }
      continue;
    }
    vec h_new;
    if constexpr (is_lstm(CELL)) {
      float* cp = a.c + static_cast<size_t>(b0 + r) * H + u;
      const vec cprev = ld(cp);
      // the pre-activation plus, with peepholes, row k of peep times the cell state it looks at
      const auto peeped = [&](int k, vec cell_state, vec pre) {
        return a.peep ? fmadd(ld(a.peep + k * H + u), cell_state, pre) : pre;
      };
      vec i = v(1.f), f = v(1.f), o = v(1.f);
      if constexpr (has_i(CELL)) i = sigmoidv(peeped(0, cprev, acc[r][0]));
      if constexpr (has_f(CELL)) f = sigmoidv(peeped(col_f(CELL), cprev, acc[r][col_f(CELL)]));
      if constexpr (lstm_has(CELL, kCoupled)) f = one_minus(i);
      const vec g = lstm_has(CELL, kLinearInput) ? acc[r][col_g(CELL)] : tanhv(acc[r][col_g(CELL)]);
      const vec c = fmadd(f, cprev, mul(i, g));
      if constexpr (has_o(CELL)) o = sigmoidv(peeped(sigmoid_gates(CELL) - 1, c, acc[r][col_o(CELL)]));
      st(cp, reset ? zero() : c);
      h_new = mul(o, lstm_has(CELL, kLinearOutput) ? c : tanhv(c));
      if (a.act) {
        float* q = a.act + row * GH + u;
        if constexpr (has_i(CELL)) st(q, i);
        if constexpr (has_f(CELL)) st(q + col_f(CELL) * H, f);
        st(q + col_g(CELL) * H, g);
        if constexpr (has_o(CELL)) st(q + col_o(CELL) * H, o);
        st(a.aux + row * H + u, c);
      }
    } else if constexpr (CELL == kGru) {
      const vec rg = sigmoidv(acc[r][0]), z = sigmoidv(acc[r][1]), hn = acc[r][2];
      const vec n = tanhv(fmadd(rg, hn, acc[r][3]));
      const vec hprev = ld(h + r * H + u);
      h_new = fmadd(z, sub(hprev, n), n);  // (1 - z) n + z h_{t-1}
      if (a.act) {
        float* q = a.act + row * GH + u;
        st(q, rg), st(q + H, z), st(q + 2 * H, n);
        st(a.aux + row * H + u, hn);
      }
    }
    st(a.ys + row * H + u, h_new);
    st(hn + static_cast<size_t>(b0 + r) * H + u, reset ? zero() : h_new);
  }
}

// Tile heights: as many rows as keep the R*A accumulators, a weight vector per gate and a broadcast in the
// vector registers (AVX2: 3 x 4 + 4 + 1 of 16; AVX-512: 6 x 4 + 4 + 1 of 32; the paired RNN 6 x 2 + 2 + 1,
// 12 x 2 + 2 + 1), and for the RNN a tile that divides common batch sizes.
template <int CELL>
constexpr int forward_rows() {
  if constexpr (is_pair(CELL)) return kRegs == 32 ? 12 : 6;
  return gates_of(CELL) == 1 ? (kRegs == 32 ? 16 : 12) : (kRegs == 32 ? 6 : 3);
}

template <int CELL, int R>
void forward_rows_rest(const ForwardArgs& a, int t, const float* hp, float* hn, int b0, int u, int rows, int k0,
                       int k1, float* save, const float* x, size_t x_stride) {
  if constexpr (R > 0) {
    if (rows == R) return forward_tile<CELL, R>(a, t, hp, hn, b0, u, k0, k1, save, x, x_stride);
    forward_rows_rest<CELL, R - 1>(a, t, hp, hn, b0, u, rows, k0, k1, save, x, x_stride);
  }
}

// The forward's inputs [x_t, h_{t-1}] are taken in blocks whose weights (a unit block's G gate columns, as
// packed) fill at most kPanelFloats floats, 32 KiB: they stay in L1 while the kGroupTiles tiles of a group of
// rows go through them, each tile's accumulators waiting in `save` for the next block. (Without blocks the
// standard LSTM's 96 KiB per unit block came from L2 for every tile.)
constexpr int kPanelFloats = 8192;
constexpr int kGroupTiles = 8;

template <int CELL>
// `xt`: where the inputs of step s are, rows r0 .. r1-1 (by slot) I floats apart, or null: in a.xs (`rows`).
void forward_chunk(const ForwardArgs& a, int s, int chunk, int r0, int r1, const float* xt = nullptr) {
  constexpr int R = forward_rows<CELL>(), G = gates_of(CELL), A = CELL == kGru ? 4 : G;
  const int t = a.reverse ? a.T - 1 - s : s;
  // h_{t-1} from the contiguous copy: batch-major ys rows T * H apart would share L1 sets
  const size_t BH = static_cast<size_t>(a.B) * a.H;
  const float* hp = s == 0 ? a.h0 : a.hs + ((s - 1) & 1) * BH;
  float* hn = a.hs + (s & 1) * BH;
  const int u = chunk * kU;
  const int K = a.I + a.H, blocks = (K * G * kU + kPanelFloats - 1) / kPanelFloats, kc = (K + blocks - 1) / blocks;
  alignas(64) float save[kGroupTiles * R * A * kU];
  for (int g0 = r0; g0 < r1; g0 += kGroupTiles * R) {
    const int g1 = std::min(g0 + kGroupTiles * R, r1);
    for (int k0 = 0; k0 < K; k0 += kc) {
      const int k1 = std::min(k0 + kc, K);
      int b0 = g0;
      float* sv = save;
      // row b's inputs: x(b) + k, rows x_stride floats apart
      const size_t x_stride = xt ? a.I : a.rows.batch_step() * a.I;
      const auto x = [&](int b) { return xt ? xt + static_cast<size_t>(b - r0) * a.I : a.xs + a.rows.at(t, b) * a.I; };
      for (; b0 + R <= g1; b0 += R, sv += R * A * kU)
        forward_tile<CELL, R>(a, t, hp, hn, b0, u, k0, k1, sv, x(b0), x_stride);
      if (b0 < g1) forward_rows_rest<CELL, R - 1>(a, t, hp, hn, b0, u, g1 - b0, k0, k1, sv, x(b0), x_stride);
    }
  }
}

// W [K, G*H] -> [H/kU][K][G][kU]
std::vector<float> pack_forward(const float* w, int K, int H, int G) {
  std::vector<float> out(static_cast<size_t>(G) * K * H);
  float* o = out.data();
  for (int u = 0; u < H; u += kU)
    for (int k = 0; k < K; ++k)
      for (int g = 0; g < G; ++g, o += kU) std::memcpy(o, w + static_cast<size_t>(k) * G * H + g * H + u, kU * 4);
  return out;
}

// ---------------------------------------------------------------------------------------- backward

// [T, B, .]: or [B, T, .], as `rows` says
struct BackwardArgs {
  const float* dys;  // [T, B, H]
  const float* ys;   // [T, B, H]
  const float* h0;   // [B, H]
  const float* c0;   // [B, H] (LSTM) or null
  const float* act;  // [T, B, G*H] from the forward pass (LSTM, GRU) or null
  const float* aux;  // [T, B, H] from the forward pass (LSTM, GRU) or null
  float* dpx;        // [T, B, G*H]: the gradient of px
  float* dghn;       // [T, B, H] (GRU): the gradient of h_{t-1} W_hn + b_hn, or null
  float* dh;         // [B, H] by slot: the gradient reaching h_t from step t+1 (starts as dhT; ends as dh0)
  float* dc;         // [B, H] (LSTM) by slot: the gradient reaching c_t (starts as dcT; ends as dc0), or null
  float* dhz;        // [B, H] by slot: the direct path to h_{t-1} (GRU: dh_t z_t; padding: dh_t), or null (no GRU, no lengths)
  const float* peep; // [S][H] (LSTM with peepholes), or null
  float* dpeep;      // [B][S*H] (with peep): each row's sums over its steps of dA_i c_{t-1}, dA_f c_{t-1}, dA_o c_t
  float* dap;        // the recurrent GEMM's output gradient of two steps (`kPackedDa`; rows past B stay 0)
  const float* wt;   // packed W_h^T: [H/kU][G*H][kU], output unit block, gate column, output unit
  Masks mask;
  int T, B, H;
  bool reverse;
  Rows rows;         // the layout of dys, ys, act, aux, dpx and dghn
};

// Batch rows per tile of the backward recurrent GEMM: 8 broadcasts and a weight load per 8 FMAs cost about
// what 12 do per 12, and 8 pads common batch sizes less.
constexpr int kRows = 8;

// The layout of dA, the recurrent GEMM's output gradient, per step: [ceil(B/kRows)][G*H][kRows] (packed by
// tiles of kRows rows: the values a tile broadcasts at one k share a cache line; the gate-derivative pass
// scatters them there), or rows of stride G*H + 16 (vector stores; the kRows rows a tile reads fall into
// different L1 sets, which rows G*H = 1024 floats apart would not). Measured on one Xeon, backward kernel
// at (B, T, I, H) = (64, 100, 128, 256), ms packed vs rows: AVX2 LSTM 57.6 vs 42.2, GRU 45.2 vs 34.7;
// AVX-512 LSTM 34.0 vs 37.1, GRU 28.9 vs 31.0 (docs/design/performance.md).
constexpr bool kPackedDa = kRegs == 32;
inline int padded_rows(int B) { return (B + kRows - 1) / kRows * kRows; }
// floats per row of dA (packed: per row of tiles / kRows)
inline size_t lda(int GH) { return kPackedDa ? GH : GH + 16; }

// Writes row b's gradient of the recurrent GEMM's output, gates g at units u .. u+kU-1, into dA of step s
// (zeros where `cut`: no gradient reaches the previous step's h).
template <int G>
inline void pack_da(const BackwardArgs& a, int s, int b, int u, const vec (&d)[G], bool cut = false) {
  const int GH = G * a.H;
  float* step = a.dap + static_cast<size_t>(s & 1) * padded_rows(a.B) * lda(GH);
  if constexpr (kPackedDa) {
    float* tile = step + (static_cast<size_t>(b / kRows) * GH + u) * kRows + b % kRows;
    alignas(64) float tmp[kU];
    for (int g = 0; g < G; ++g) {
      st(tmp, cut ? zero() : d[g]);
      float* col = tile + static_cast<size_t>(g) * a.H * kRows;
      for (int j = 0; j < kU; ++j) col[j * kRows] = tmp[j];
    }
  } else {
    float* row = step + b * lda(GH) + u;
    for (int g = 0; g < G; ++g) st(row + static_cast<size_t>(g) * a.H, cut ? zero() : d[g]);
  }
}

// The gate derivatives of backward step s (forward step t) for units u .. u+kU-1, all rows.
template <int CELL>
void gate_grads(const BackwardArgs& a, int s, int u, int r0, int r1) {
  constexpr int G = gates_of(CELL);
  const int H = a.H, GH = G * H;
  const int t = a.reverse ? s : a.T - 1 - s;
  const int tp = a.reverse ? t + 1 : t - 1;
  const bool first = tp < 0 || tp >= a.T;
  for (int b = r0; b < r1; ++b) {
    const int pb = a.mask.phys(b);  // the batch row in slot b: dh, dc and dhz are by slot, the rest by row
    const size_t row = a.rows.at(t, pb), bu = static_cast<size_t>(b) * H + u, pu = static_cast<size_t>(pb) * H + u;
    float* dpx = a.dpx + row * GH + u;
    if (!a.mask.active(t, b)) {  // padding: no gate gradients; dh (and dc) pass to the step before unchanged
      vec d[G];
      for (int g = 0; g < G; ++g) d[g] = zero(), st(dpx + g * H, zero());
      if constexpr (CELL == kGru) st(a.dghn + row * H + u, zero());
      pack_da<G>(a, s, b, u, d, true);
      st(a.dhz + bu, ld(a.dh + bu));
      continue;
    }
    // h_{t-1} is h0 at a sequence's first step (reverse: the step after it is padding), zero after a reset,
    // and then no gradient reaches the carry before it (dA, dc and dh z are zero)
    const bool start = first || !a.mask.active(tp, b), reset = a.mask.reset(t, b);
    const size_t prow = start ? 0 : a.rows.at(tp, pb);
    const vec dh = add(ld(a.dh + bu), ld(a.dys + row * H + u));
    if constexpr (is_lstm(CELL)) {
      constexpr int S = sigmoid_gates(CELL);
      const float* q = a.act + row * GH + u;
      const vec i = has_i(CELL) ? ld(q) : v(1.f), g = ld(q + col_g(CELL) * H);
      const vec f = has_f(CELL) ? ld(q + col_f(CELL) * H) : lstm_has(CELL, kCoupled) ? one_minus(i) : v(1.f);
      const vec o = has_o(CELL) ? ld(q + col_o(CELL) * H) : v(1.f);
      const vec c = ld(a.aux + row * H + u), tc = lstm_has(CELL, kLinearOutput) ? c : tanhv(c);
      const vec cprev = reset ? zero() : start ? ld(a.c0 + pu) : ld(a.aux + prow * H + u);
      const float* peep = a.peep ? a.peep + u : nullptr;  // rows p_i, p_f, p_o as present, H apart
      vec d[G];
      vec dcc = lstm_has(CELL, kLinearOutput) ? fmadd(dh, o, ld(a.dc + bu))
                                              : fmadd(mul(dh, o), one_minus(mul(tc, tc)), ld(a.dc + bu));
      if constexpr (has_o(CELL)) {
        d[col_o(CELL)] = mul(mul(dh, tc), mul(o, one_minus(o)));
        if (peep) dcc = fmadd(d[col_o(CELL)], ld(peep + (S - 1) * H), dcc);  // c_t reaches o_t
      }
      // CIFG: i_t scales g_t and, through f_t = 1 - i_t, c_{t-1}
      if constexpr (has_i(CELL))
        d[0] = mul(mul(dcc, lstm_has(CELL, kCoupled) ? sub(g, cprev) : g), mul(i, one_minus(i)));
      if constexpr (has_f(CELL)) d[col_f(CELL)] = mul(mul(dcc, cprev), mul(f, one_minus(f)));
      d[col_g(CELL)] = lstm_has(CELL, kLinearInput) ? mul(dcc, i) : mul(mul(dcc, i), one_minus(mul(g, g)));
      for (int k = 0; k < G; ++k) st(dpx + k * H, d[k]);
      pack_da<G>(a, s, b, u, d, reset);
      vec dc_prev = mul(dcc, f);
      if (peep) {  // c_{t-1} reaches i_t and f_t too
        if constexpr (has_i(CELL)) dc_prev = fmadd(d[0], ld(peep), dc_prev);
        if constexpr (has_f(CELL)) dc_prev = fmadd(d[col_f(CELL)], ld(peep + col_f(CELL) * H), dc_prev);
        float* dp = a.dpeep + static_cast<size_t>(pb) * S * H + u;
        if constexpr (has_i(CELL)) st(dp, fmadd(d[0], cprev, ld(dp)));
        if constexpr (has_f(CELL)) st(dp + col_f(CELL) * H, fmadd(d[col_f(CELL)], cprev, ld(dp + col_f(CELL) * H)));
        if constexpr (has_o(CELL)) st(dp + (S - 1) * H, fmadd(d[col_o(CELL)], c, ld(dp + (S - 1) * H)));
      }
      st(a.dc + bu, reset ? zero() : dc_prev);
      if (a.dhz) st(a.dhz + bu, zero());
    } else if constexpr (CELL == kGru) {
      const float* q = a.act + row * GH + u;
      const vec rg = ld(q), z = ld(q + H), n = ld(q + 2 * H);
      const vec hprev = reset ? zero() : start ? ld(a.h0 + pu) : ld(a.ys + prow * H + u);
      const vec dn = mul(mul(dh, one_minus(z)), one_minus(mul(n, n)));
      const vec dr = mul(mul(dn, ld(a.aux + row * H + u)), mul(rg, one_minus(rg)));
      const vec dz = mul(mul(dh, sub(hprev, n)), mul(z, one_minus(z)));
      const vec dhn = mul(dn, rg);
      st(dpx, dr), st(dpx + H, dz), st(dpx + 2 * H, dn);
      st(a.dghn + row * H + u, dhn);
      const vec d[3] = {dr, dz, dhn};
      pack_da<3>(a, s, b, u, d, reset);
      st(a.dhz + bu, reset ? zero() : mul(dh, z));
    } else {
      const vec y = ld(a.ys + row * H + u);
      const vec da[1] = {CELL == kRnnTanh ? mul(dh, one_minus(mul(y, y))) : where_positive(y, dh)};
      st(dpx, da[0]);
      pack_da<1>(a, s, b, u, da, reset);
      if (a.dhz) st(a.dhz + bu, zero());
    }
  }
}

// dh[b0 .. b0+R-1, u .. u+NV*kU-1] = dA W_h^T (+ dh z for the GRU), ``da`` the recurrent GEMM's output
// gradient of forward step tq from row b0 on (`kPackedDa`). A row that step tq cuts off (`Masks::cut`: its dA
// is zero) gets dhz (or zero) as it is, not 0 * W_h: a NaN or Inf in W_h does not reach it, as XLA's select
// keeps it from the carry there.
template <int CELL, int NV, int R>
void recurrent_tile(const BackwardArgs& a, const float* da, int b0, int u, int tq) {
  constexpr int G = gates_of(CELL);
  const int GH = G * a.H;
  vec acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j)
      acc[r][j] = a.dhz ? ld(a.dhz + static_cast<size_t>(b0 + r) * a.H + u + j * kU) : v(0.f);
  const float* w = a.wt + static_cast<size_t>(u) * GH;  // unit block j's columns: w + j * kU * GH
  // where row r's value at column k is: da + k * k_step + r * r_step
  const size_t k_step = kPackedDa ? kRows : 1, r_step = kPackedDa ? 1 : lda(GH);
  for (int k = 0; k < GH; ++k, w += kU, da += k_step) {
    vec wk[NV];
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) wk[j] = ld(w + static_cast<size_t>(j) * kU * GH);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const vec x = bcast(da + r * r_step);
#pragma GCC unroll 2
      for (int j = 0; j < NV; ++j) acc[r][j] = fmadd(x, wk[j], acc[r][j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const size_t at = static_cast<size_t>(b0 + r) * a.H + u;
    const bool cut = a.mask.cut(tq, b0 + r);
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) st(a.dh + at + j * kU, !cut ? acc[r][j] : a.dhz ? ld(a.dhz + at + j * kU) : zero());
  }
}

// The `rows` (1 .. kRows) rows from b0 on: a full tile, or a batch's last rows in tiles of 4, 2 and 1 (a tile
// of kRows rows would spend its FMAs on rows that do not exist: 8 times the work at B = 1). A row's dh sees the
// same FMAs in the same order in a tile of any height. (Short tiles of more unit blocks, up to 1 x 8, for more
// FMA chains in flight, were slower: LSTM, B = 1, H = 128, 4,300 perf samples in the tile against 3,150. At
// B = 1 the tile streams W_h from L2, and more weight streams at once did not help.)
template <int CELL, int NV>
void recurrent_rows(const BackwardArgs& a, const float* da, int b0, int rows, int u, int tq) {
  static_assert(kRows == 8, "the last rows go in tiles of 4, 2 and 1");
  if (rows == kRows) return recurrent_tile<CELL, NV, kRows>(a, da, b0, u, tq);
  const size_t r_step = kPackedDa ? 1 : lda(gates_of(CELL) * a.H);
  if (rows & 4) recurrent_tile<CELL, NV, 4>(a, da, b0, u, tq), b0 += 4, da += 4 * r_step;
  if (rows & 2) recurrent_tile<CELL, NV, 2>(a, da, b0, u, tq), b0 += 2, da += 2 * r_step;
  if (rows & 1) recurrent_tile<CELL, NV, 1>(a, da, b0, u, tq);
}

// Unit blocks per backward chunk: two with AVX-512 where H allows (a weight load per 16 FMAs and 8 broadcasts
// rather than per 8: the tile was bound by its loads), else one (AVX2 has registers for 8 x 1 only). Each
// dh element sees the same FMAs in the same order either way.
inline int backward_blocks(int H) { return kRegs == 32 && H % (2 * kU) == 0 ? 2 : 1; }

// Step s of the team: chunk u's part of dh_{t-1} = dA_t W_h^T, then its units' gate derivatives of
// step s + 1 (which need only those dh entries). Step 0 computes only the gate derivatives of step 0.
template <int CELL>
void backward_chunk(const BackwardArgs& a, int s, int chunk, int r0, int r1) {
  const int nv = backward_blocks(a.H), u = chunk * nv * kU, GH = gates_of(CELL) * a.H;
  if (s > 0) {
    // r0 is a multiple of kRows: row r0 (packed: tile r0 / kRows) starts r0 * lda(GH) floats in
    const float* da = a.dap + (static_cast<size_t>((s - 1) & 1) * padded_rows(a.B) + r0) * lda(GH);
    const int tq = a.reverse ? s - 1 : a.T - s;  // the forward step whose dA this is
    for (int b0 = r0; b0 < r1; b0 += kRows, da += kRows * lda(GH)) {
      const int rows = std::min(kRows, r1 - b0);
      // rows of padding only: dA = 0 and dh passes unchanged (gate_grads left it where it is)
      if (a.mask.padding_only(tq, b0, rows)) continue;
      if (nv == 2) {
        recurrent_rows<CELL, 2>(a, da, b0, rows, u, tq);
      } else {
        recurrent_rows<CELL, 1>(a, da, b0, rows, u, tq);
      }
    }
  }
  if (s < a.T)
    for (int j = 0; j < nv; ++j) gate_grads<CELL>(a, s, u + j * kU, r0, r1);
}

// W_h [H, G*H] -> [H/kU][G*H][kU]
std::vector<float> pack_backward(const float* w_h, int H, int G) {
  std::vector<float> out(static_cast<size_t>(G) * H * H);
  float* o = out.data();
  const int GH = G * H;
  for (int u = 0; u < H; u += kU)
    for (int k = 0; k < GH; ++k, o += kU)
      for (int j = 0; j < kU; ++j) o[j] = w_h[static_cast<size_t>(u + j) * GH + k];
  return out;
}

// -------------------------------------------------------------------------------- weight gradients

// dW_x = sum_rows x^T dA_x, dW_h = sum_rows h_{t-1}^T dA_h, db = sum_rows dpx and (GRU) db_hn = sum_rows dghn,
// over all T*B rows, where dA_x = dpx and dA_h = dpx except in the GRU's n block, which is dghn there.
// A GEMM blocked as in BLIS: per block of kGemmRows rows, the features are packed into tiles of kMr
// ([tile][row][kMr]) and the gradient columns into panels of up to kNv vectors ([panel][row][columns]); each
// (panel, tile) pair then sums kMr x kNv*kU outputs in registers over the block's rows, the panel (32 KiB
// with AVX-512) staying in L1 while the tiles stream past it.
//
// The rows are taken in memory order, in two fixed halves, each summed into its own partial (a thread each,
// or both on one thread) and the two added last: the results are bitwise the same for any thread count.

struct WeightGradArgs {
  const float* xs;    // [T, B, I] or [B, T, I] (`rows`)
  const float* ys;    // as xs, H features: h_t
  const float* h0;    // [B, H]
  const float* dpx;   // as xs, G*H features
  const float* dghn;  // as ys (GRU) or null
  Masks mask;
  const float* zeros;  // [H]: h_{t-1} after a reset
  int T, B, I, H, G;
  bool reverse;
  Rows rows;

  int step(size_t q) const { return static_cast<int>(rows.batch_major ? q % T : q / B); }
  int batch(size_t q) const { return static_cast<int>(rows.batch_major ? q / T : q % B); }
  // whether row q of the sequence arrays holds a valid step (padding rows have zero gradients)
  bool valid(size_t q) const { return mask.active(step(q), batch(q)); }
  // h_{t-1} of the step and batch row at row q of the sequence arrays
  const float* hprev(size_t q) const {
    const int t = step(q), b = batch(q);
    if (mask.reset(t, b)) return zeros;
    const int tp = reverse ? t + 1 : t - 1;
    return tp < 0 || tp >= T || !mask.active(tp, b) ? h0 + static_cast<size_t>(b) * H : ys + rows.at(tp, b) * H;
  }
};

constexpr int kMr = kRegs == 32 ? 6 : 3;  // features per tile: kMr x kNv accumulators, as the forward's tiles
constexpr int kNv = 4;                     // vectors per panel
constexpr int kNr = kNv * kU;              // gradient columns per panel
constexpr int kGemmRows = 128;             // rows per block: a panel is kGemmRows * kNr * 4 bytes

// One partial: dw_x [I, G*H], dw_h [H, G*H], db [G*H], db_hn [H] (GRU, else null), all summed into.
struct WeightGradOut {
  float *dw_x, *dw_h, *db, *db_hn;
};

// c[r][v*kU ..] += sum_k pa[k][r] pb[k][v*kU ..] for r < rows (c's row stride ldc), k < kk.
template <int NV>
void gemm_tile(const float* pa, const float* pb, int kk, float* c, int ldc, int rows) {
  vec acc[kMr][NV];
#pragma GCC unroll 16
  for (int r = 0; r < kMr; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = r < rows ? ld(c + r * ldc + j * kU) : zero();
  accumulate<kMr, NV, kMr>(acc, pa, 1, pb, kk, [](int j) { return j; });
#pragma GCC unroll 16
  for (int r = 0; r < kMr; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      if (r < rows) st(c + r * ldc + j * kU, acc[r][j]);
}

void gemm_panel(int nv, const float* pa, const float* pb, int kk, float* c, int ldc, int rows) {
  switch (nv) {
    case 4: return gemm_tile<4>(pa, pb, kk, c, ldc, rows);
    case 3: return gemm_tile<3>(pa, pb, kk, c, ldc, rows);
    case 2: return gemm_tile<2>(pa, pb, kk, c, ldc, rows);
    default: return gemm_tile<1>(pa, pb, kk, c, ldc, rows);
  }
}

// Packs row k of a block: `n` features of `src` into tiles of kMr ([tile][kGemmRows][kMr]), zero-padded.
inline void pack_features(const float* src, int n, float* pa, int k) {
  float* dst = pa + static_cast<size_t>(k) * kMr;
  constexpr size_t kTile = static_cast<size_t>(kGemmRows) * kMr;
  int m0 = 0;
  for (; m0 + kMr <= n; m0 += kMr, dst += kTile) std::memcpy(dst, src + m0, kMr * 4);
  if (m0 < n) {
    for (int r = 0; r < kMr; ++r) dst[r] = m0 + r < n ? src[m0 + r] : 0.f;
  }
}

// Packs row k of a block: gradient columns p_lo * kNr .. p_hi * kNr - 1 (at most G*H) of `d` into panels
// ([panel - p_lo][kGemmRows][width]), the GRU's n block taken from `dn` where given, and adds them to `sum`.
inline void pack_columns(const float* d, const float* dn, int H, int GH, int p_lo, int p_hi, float* pb, int k,
                         float* sum) {
  constexpr size_t kPanel = static_cast<size_t>(kGemmRows) * kNr;
  for (int p0 = p_lo * kNr; p0 < std::min(GH, p_hi * kNr); p0 += kNr) {
    const int w = std::min(kNr, GH - p0);  // a multiple of kU
    float* dst = pb + (p0 / kNr - p_lo) * kPanel + static_cast<size_t>(k) * w;
    for (int j = 0; j < w; j += kU) {
      const int col = p0 + j;
      const float* src = dn && col >= 2 * H && col < 3 * H ? dn + col - 2 * H : d + col;
      const vec x = ld(src);
      st(dst + j, x);
      st(sum + col, add(ld(sum + col), x));
    }
  }
}

// Sums rows q0 .. q1-1 (in memory order) into `out`.
void weight_grads_part(const WeightGradArgs& a, int64_t q0, int64_t q1, const WeightGradOut& out) {
  const int I = a.I, H = a.H, GH = a.G * H;
  const bool gru = a.dghn != nullptr;
  const int panels = (GH + kNr - 1) / kNr, tiles_x = (I + kMr - 1) / kMr, tiles_h = (H + kMr - 1) / kMr;
  std::memset(out.dw_x, 0, static_cast<size_t>(I) * GH * 4);
  std::memset(out.dw_h, 0, static_cast<size_t>(H) * GH * 4);
  std::memset(out.db, 0, static_cast<size_t>(GH) * 4);
  // the GRU's h side sees dghn in the n block: the panels n_lo .. n_hi - 1 that hold some of it are packed
  // again from there (db_hn is that block's sum)
  const int n_lo = gru ? 2 * H / kNr : 0, n_hi = gru ? (3 * H + kNr - 1) / kNr : 0;
  std::vector<float> dbh(gru ? GH : 0);
  const size_t panel = static_cast<size_t>(kGemmRows) * kNr, tile = static_cast<size_t>(kGemmRows) * kMr;
  std::vector<float> pa((tiles_x + tiles_h) * tile), pb(panels * panel), pbh((n_hi - n_lo) * panel);
  // blocks of kGemmRows valid rows, in memory order (padding rows, whose gradients are zero, are left out)
  for (int64_t q = q0; q < q1;) {
    int kk = 0;
    for (; q < q1 && kk < kGemmRows; ++q) {
      const size_t row = static_cast<size_t>(q);
      if (a.mask.len && !a.valid(row)) continue;
      const int k = kk++;
      pack_features(a.xs + row * I, I, pa.data(), k);
      pack_features(a.hprev(row), H, pa.data() + tiles_x * tile, k);
      pack_columns(a.dpx + row * GH, nullptr, H, GH, 0, panels, pb.data(), k, out.db);
      if (gru) pack_columns(a.dpx + row * GH, a.dghn + row * H, H, GH, n_lo, n_hi, pbh.data(), k, dbh.data());
    }
    if (kk == 0) break;
    for (int p = 0; p < panels; ++p) {
      const int nv = std::min(kNr, GH - p * kNr) / kU;
      const float* px = pb.data() + p * panel;
      const float* ph = p >= n_lo && p < n_hi ? pbh.data() + (p - n_lo) * panel : px;
      for (int i = 0; i < tiles_x; ++i)
        gemm_panel(nv, pa.data() + i * tile, px, kk, out.dw_x + static_cast<size_t>(i) * kMr * GH + p * kNr, GH,
                   std::min(kMr, I - i * kMr));
      for (int i = 0; i < tiles_h; ++i)
        gemm_panel(nv, pa.data() + (tiles_x + i) * tile, ph, kk,
                   out.dw_h + static_cast<size_t>(i) * kMr * GH + p * kNr, GH, std::min(kMr, H - i * kMr));
    }
  }
  if (gru) std::memcpy(out.db_hn, dbh.data() + 2 * H, static_cast<size_t>(H) * 4);
}

// ------------------------------------------------------------------------------------------ handlers

template <typename Buf>
auto ptr_or_null(const Buf& b) -> const std::remove_pointer_t<decltype(b.typed_data())>* {
  return b.element_count() ? b.typed_data() : nullptr;
}
template <typename Buf>
float* out_or_null(Buf& b) {
  return b->element_count() ? b->typed_data() : nullptr;
}

// XLA allocates a call's temporaries afresh on every call (one mapping per call once they pass malloc's
// mmap threshold), so the first touch of each 4 KiB page of a result faults: about 12 000 faults per LSTM
// train step at (B, T, H) = (64, 100, 256). With SEQJAX_HUGE_PAGES=1 in the environment the kernels advise
// transparent huge pages on the 2 MiB-aligned part of each large result, so that the kernel faults it in
// 2 MiB at a time where the system allows it (a hint: it changes no contents; 3 700 faults per such step).
// Off by default: on a 2-core VM, calls whose fresh huge pages the host had to back took up to 10x as long,
// all of it in the OS kernel, when another program ran between them, and training loops that also evaluate
// ran as fast or faster without it (docs/design/performance.md).
inline bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* v = std::getenv("SEQJAX_HUGE_PAGES");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return wanted;
}

template <typename Buf>
void advise_huge_pages(Buf& b) {
  if (!huge_pages_wanted()) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto start = reinterpret_cast<uintptr_t>(b->typed_data());
  const uintptr_t lo = (start + kHuge - 1) & ~(kHuge - 1), hi = (start + b->element_count() * 4) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
}

// How two threads share a pass: by hidden units, every step (`Team`'s chunks, one barrier per step), or by
// batch rows, each thread running its half of the batch through all the steps on its own (the rows are
// independent recurrences: no barrier, no h crossing cores, but each thread reads all the weights every
// step). Measured (docs/design/performance.md): rows win the backward pass wherever both halves get
// a full 8-row tile, and the forward for the RNN and for steps under 1.5 Mflop; the LSTM's and GRU's
// bigger forward steps, whose weights dominate the traffic, run faster split by units.
inline bool split_rows(int helpers, int B) { return helpers > 0 && B >= 2 * kRows; }
inline bool split_rows_forward(int helpers, int B, int64_t cell, int64_t flops_per_step) {
  return split_rows(helpers, B) && (is_rnn(cell) || flops_per_step < (int64_t{3} << 19));
}
// the first row of the second half: a multiple of kRows (the packed dA's tiles)
inline int row_split(int B) { return (B / 2 + kRows - 1) / kRows * kRows; }

// `Masks::order` for a pass: the batch rows longest first (ties in row order), so that tiles of padding come
// together; for a pass split by batch rows, tiles of kRows rows go to the two halves in turn, each half then
// sorted again, so that both get their share of the long sequences. Empty (no reordering) without lengths or
// where the rows are in that order already.
std::vector<int> length_order(const int32_t* len, int B, bool split) {
  if (!len) return {};
  std::vector<int> order(B);
  for (int b = 0; b < B; ++b) order[b] = b;
  const auto longer = [len](int x, int y) { return len[x] > len[y]; };
  std::stable_sort(order.begin(), order.end(), longer);
  if (split) {
    const size_t half = static_cast<size_t>(row_split(B));
    std::vector<int> first, second;
    for (int b = 0; b < B; ++b) (b / kRows % 2 == 0 ? first : second).push_back(order[b]);
    for (; first.size() > half; first.pop_back()) second.push_back(first.back());
    for (; first.size() < half; second.pop_back()) first.push_back(second.back());
    std::stable_sort(first.begin(), first.end(), longer);
    std::stable_sort(second.begin(), second.end(), longer);
    std::copy(second.begin(), second.end(), std::copy(first.begin(), first.end(), order.begin()));
  }
  for (int b = 0; b < B; ++b)
    if (order[b] != b) return order;
  return {};
}

// rows n (of `width` floats) of `src` in `order`'s slots: out[slot] = src[order[slot]], or back (`to_rows`)
void permute_rows(const std::vector<int>& order, const float* src, float* out, size_t width, bool to_rows = false) {
  for (size_t slot = 0; slot < order.size(); ++slot) {
    const size_t row = static_cast<size_t>(order[slot]);
    std::memcpy(out + (to_rows ? row : slot) * width, src + (to_rows ? slot : row) * width, width * 4);
  }
}

// Helpers to ask for: `threads` - 1 if given, else one where a step has enough work to pay for a barrier.
int helpers_for(int64_t threads, int64_t flops_per_step) {
  if (threads > 0) return static_cast<int>(threads) - 1;
  return flops_per_step >= (int64_t{1} << 19) ? 1 : 0;
}

// the cells `dispatch` runs: Greff et al.'s LSTM variants one change at a time (FGR aside)
constexpr bool known(int64_t cell) {
  if (cell == kLstm || cell == kGru || cell == kRnnTanh || cell == kRnnRelu) return true;
  for (int64_t bits : {kNoInputGate, kNoForgetGate, kNoOutputGate, kCoupled, kLinearInput, kLinearOutput})
    if (cell == (kLstmVariant | bits)) return true;
  return false;
}

ffi::Error check(int64_t cell, int H) {
  if (!known(cell))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "seqjax avx2: unknown cell " + std::to_string(cell));
  if (H % kU != 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "seqjax avx2: the hidden size must be a multiple of " + std::to_string(kU) + ", got " + std::to_string(H));
  return ffi::Error::Success();
}

template <typename Fn>
void dispatch(int64_t cell, Fn fn) {
  switch (cell) {
    case kLstm: return fn(std::integral_constant<int, kLstm>());
    case kLstmVariant | kNoInputGate: return fn(std::integral_constant<int, kLstmVariant | kNoInputGate>());
    case kLstmVariant | kNoForgetGate: return fn(std::integral_constant<int, kLstmVariant | kNoForgetGate>());
    case kLstmVariant | kNoOutputGate: return fn(std::integral_constant<int, kLstmVariant | kNoOutputGate>());
    case kLstmVariant | kCoupled: return fn(std::integral_constant<int, kLstmVariant | kCoupled>());
    case kLstmVariant | kLinearInput: return fn(std::integral_constant<int, kLstmVariant | kLinearInput>());
    case kLstmVariant | kLinearOutput: return fn(std::integral_constant<int, kLstmVariant | kLinearOutput>());
    case kGru: return fn(std::integral_constant<int, kGru>());
    case kRnnTanh: return fn(std::integral_constant<int, kRnnTanh>());
    default: return fn(std::integral_constant<int, kRnnRelu>());
  }
}

// `dispatch` for the forward pass, which also runs the paired RNN
template <typename Fn>
void dispatch_forward(int64_t cell, Fn fn) {
  switch (cell) {
    case kRnnTanhPair: return fn(std::integral_constant<int, kRnnTanhPair>());
    case kRnnReluPair: return fn(std::integral_constant<int, kRnnReluPair>());
    default: return dispatch(cell, fn);
  }
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_x,
                       ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> extra,
                       ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::S32> lengths,
                       ffi::Buffer<ffi::PRED> resets, ffi::ResultBuffer<ffi::F32> ys,
                       ffi::ResultBuffer<ffi::F32> hT, ffi::ResultBuffer<ffi::F32> cT,
                       ffi::ResultBuffer<ffi::F32> act, ffi::ResultBuffer<ffi::F32> aux, int64_t cell,
                       bool reverse, int64_t threads, bool batch_major) {
  const auto dims = xs.dimensions();
  const int T = static_cast<int>(dims[batch_major ? 1 : 0]), B = static_cast<int>(dims[batch_major ? 0 : 1]);
  const int I = static_cast<int>(dims[2]);
  const int H = static_cast<int>(h0.dimensions()[1]);
  if (auto e = check(cell, H); e.failure()) return e;
  const bool pair = (cell == kRnnTanh || cell == kRnnRelu) && H % (2 * kU) == 0;
  const int64_t run_as = pair ? (cell == kRnnTanh ? kRnnTanhPair : kRnnReluPair) : cell;
  const int G = gates_of(run_as), GS = pair ? H / 2 : H;  // gates of GS units
  const size_t BH = static_cast<size_t>(B) * H;
  const bool peep = is_lstm(cell) && extra.element_count() > 0;
  if (peep && extra.element_count() != static_cast<size_t>(sigmoid_gates(cell)) * H)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "seqjax avx2: peep must hold one row of H per sigmoid gate");
  advise_huge_pages(ys), advise_huge_pages(act), advise_huge_pages(aux);
  float* c = out_or_null(cT);
  if (c) std::memcpy(c, c0.typed_data(), BH * 4);
  if (T == 0) {
    std::memcpy(hT->typed_data(), h0.typed_data(), BH * 4);
    return ffi::Error::Success();
  }
  const int64_t flops_per_step = int64_t{2} * B * (I + H) * G * GS;
  const int helpers = helpers_for(threads, flops_per_step);
  const bool split = split_rows_forward(helpers, B, cell, flops_per_step);
  const Rows rows{T, B, batch_major};
  // with lengths, the rows longest first: h0, c0 and xs taken into that order (ys and the residuals are
  // written where they belong). Split by rows, each thread copies its rows' inputs step by step; else xs is
  // copied whole before the steps.
  const std::vector<int> order = length_order(ptr_or_null(lengths), B, split);
  const float* x = xs.typed_data();
  // step t's inputs of slots slot0 .. slot1-1, each to dst + dst_row(slot) * I
  const auto take_inputs = [&](int t, int slot0, int slot1, float* dst, auto dst_row) {
    for (int slot = slot0; slot < slot1; ++slot)
      std::memcpy(dst + dst_row(slot) * I, x + rows.at(t, order[slot]) * I, I * sizeof(float));
  };
  std::vector<float> xs_slots, c_slots;
  std::vector<float> h0_own;  // h0 by slot where it differs from the operand: reordered, or zeroed by a reset
  if (!order.empty()) {
    if (!split) {
      xs_slots.resize(static_cast<size_t>(T) * B * I);
      for (int t = 0; t < T; ++t) take_inputs(t, 0, B, xs_slots.data(), [&](int slot) { return rows.at(t, slot); });
    }
    h0_own.resize(BH), permute_rows(order, h0.typed_data(), h0_own.data(), H);
    if (c) c_slots.resize(BH), permute_rows(order, c0.typed_data(), c_slots.data(), H), c = c_slots.data();
  }
  const std::vector<float> wx = pack_forward(w_x.typed_data(), I, GS, G), wh = pack_forward(w_h.typed_data(), H, GS, G);
  std::vector<float> hs(2 * BH);
  const Masks mask{ptr_or_null(lengths), ptr_or_null(resets), T, B, order.empty() ? nullptr : order.data()};
  // rows that reset at the first step start from zero (the later steps' resets zero the carry as they go)
  const int t0 = reverse ? T - 1 : 0;
  for (int slot = 0; slot < B && mask.resets; ++slot) {
    if (!mask.reset(t0, slot)) continue;
    if (h0_own.empty()) h0_own.assign(h0.typed_data(), h0.typed_data() + BH);
    std::fill_n(h0_own.data() + static_cast<size_t>(slot) * H, H, 0.f);
    if (c) std::fill_n(c + static_cast<size_t>(slot) * H, H, 0.f);
  }
  const float* h_start = h0_own.empty() ? h0.typed_data() : h0_own.data();
  ForwardArgs a{xs_slots.empty() ? x : xs_slots.data(), b.typed_data(), cell == kGru ? ptr_or_null(extra) : nullptr,
                peep ? extra.typed_data() : nullptr, h_start, ys->typed_data(), c,
                out_or_null(act), out_or_null(aux), wx.data(), wh.data(), hs.data(), mask, T, B, I, H, reverse, rows};
  const int chunks = GS / kU;
  dispatch_forward(run_as, [&](auto kind) {
    constexpr int CELL = decltype(kind)::value;
    if (split) {
      const int half = row_split(B);
      Team::run(1, 2, helpers, &pool, [&](int, int part) {
        const int r0 = part ? half : 0, r1 = part ? B : half;
        std::vector<float> xt(order.empty() ? 0 : static_cast<size_t>(r1 - r0) * I);
        for (int s = 0; s < T; ++s) {
          if (!xt.empty())  // this step's inputs of rows r0 .. r1-1, by slot
            take_inputs(reverse ? T - 1 - s : s, r0, r1, xt.data(), [r0](int slot) { return size_t(slot - r0); });
          for (int c = 0; c < chunks; ++c) forward_chunk<CELL>(a, s, c, r0, r1, xt.empty() ? nullptr : xt.data());
        }
      });
    } else {
      Team::run(T, chunks, helpers, &pool, [&](int s, int chunk) { forward_chunk<CELL>(a, s, chunk, 0, B); });
    }
  });
  const float* h_last = hs.data() + ((T - 1) & 1) * BH;
  if (order.empty()) {
    std::memcpy(hT->typed_data(), h_last, BH * 4);
  } else {
    permute_rows(order, h_last, hT->typed_data(), H, true);
    if (c) permute_rows(order, c, cT->typed_data(), H, true);
  }
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dys, ffi::Buffer<ffi::F32> dhT,
                        ffi::Buffer<ffi::F32> dcT, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> ys,
                        ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> act,
                        ffi::Buffer<ffi::F32> aux, ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::PRED> resets,
                        ffi::Buffer<ffi::F32> extra, ffi::ResultBuffer<ffi::F32> dpx,
                        ffi::ResultBuffer<ffi::F32> dghn, ffi::ResultBuffer<ffi::F32> dh0,
                        ffi::ResultBuffer<ffi::F32> dc0, ffi::ResultBuffer<ffi::F32> dpeep, int64_t cell,
                        bool reverse, int64_t threads, bool batch_major) {
  const auto dims = dys.dimensions();
  const int T = static_cast<int>(dims[batch_major ? 1 : 0]), B = static_cast<int>(dims[batch_major ? 0 : 1]);
  const int H = static_cast<int>(dims[2]);
  if (auto e = check(cell, H); e.failure()) return e;
  const int G = gates_of(cell);
  const size_t BH = static_cast<size_t>(B) * H;
  // seqjax.persistent may hand us act and aux as dpx and dghn (gate_grads reads each element before it
  // writes the same one); those are mapped already
  if (dpx->typed_data() != act.typed_data()) advise_huge_pages(dpx);
  if (dghn->typed_data() != aux.typed_data()) advise_huge_pages(dghn);
  const bool peep = is_lstm(cell) && extra.element_count() > 0;
  const size_t peep_rows = peep ? sigmoid_gates(cell) : 0;
  if (peep && (extra.element_count() != peep_rows * H || dpeep->element_count() != peep_rows * BH))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "seqjax avx2: peep must hold one row of H per sigmoid gate, and dpeep B such rows");
  float* dp = peep ? dpeep->typed_data() : nullptr;
  if (dp) std::fill_n(dp, peep_rows * BH, 0.f);
  float* dc = out_or_null(dc0);
  if (dc) std::memcpy(dc, dcT.typed_data(), BH * 4);
  float* dh = dh0->typed_data();
  std::memcpy(dh, dhT.typed_data(), BH * 4);
  if (T == 0) return ffi::Error::Success();
  const std::vector<float> wt = pack_backward(w_h.typed_data(), H, G);
  const int32_t* len = ptr_or_null(lengths);
  const int helpers = helpers_for(threads, int64_t{2} * B * H * G * H);
  // with lengths, the rows longest first (`Masks`): dh and dc held by slot, and put back at the end
  const std::vector<int> order = length_order(len, B, split_rows(helpers, B));
  std::vector<float> dh_slots, dc_slots;
  if (!order.empty()) {
    dh_slots.resize(BH), permute_rows(order, dhT.typed_data(), dh_slots.data(), H), dh = dh_slots.data();
    if (dc) dc_slots.resize(BH), permute_rows(order, dcT.typed_data(), dc_slots.data(), H), dc = dc_slots.data();
  }
  std::vector<float> dhz_buffer(cell == kGru || len ? BH : 0);
  float* dhz = dhz_buffer.empty() ? nullptr : dhz_buffer.data();
  std::vector<float> dap(2 * static_cast<size_t>(padded_rows(B)) * lda(G * H), 0.f);
  BackwardArgs a{dys.typed_data(), ys.typed_data(), h0.typed_data(), ptr_or_null(c0), ptr_or_null(act),
                 ptr_or_null(aux), dpx->typed_data(), out_or_null(dghn), dh, dc, dhz,
                 peep ? extra.typed_data() : nullptr, dp, dap.data(), wt.data(),
                 {len, ptr_or_null(resets), T, B, order.empty() ? nullptr : order.data()}, T, B, H, reverse,
                 {T, B, batch_major}};
  const int chunks = H / (backward_blocks(H) * kU);
  dispatch(cell, [&](auto kind) {
    constexpr int CELL = decltype(kind)::value;
    if (split_rows(helpers, B)) {
      const int half = row_split(B);
      Team::run(1, 2, helpers, &pool, [&](int, int part) {
        const int r0 = part ? half : 0, r1 = part ? B : half;
        for (int s = 0; s <= T; ++s)
          for (int c = 0; c < chunks; ++c) backward_chunk<CELL>(a, s, c, r0, r1);
      });
    } else {
      Team::run(T + 1, chunks, helpers, &pool, [&](int s, int chunk) { backward_chunk<CELL>(a, s, chunk, 0, B); });
    }
  });
  if (!order.empty()) {
    permute_rows(order, dh, dh0->typed_data(), H, true);
    if (dc) permute_rows(order, dc, dc0->typed_data(), H, true);
  }
  return ffi::Error::Success();
}

ffi::Error WeightGradsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> ys,
                           ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> dpx, ffi::Buffer<ffi::F32> dghn,
                           ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::PRED> resets,
                           ffi::ResultBuffer<ffi::F32> dw_x, ffi::ResultBuffer<ffi::F32> dw_h,
                           ffi::ResultBuffer<ffi::F32> db, ffi::ResultBuffer<ffi::F32> db_hn, int64_t cell,
                           bool reverse, int64_t threads, bool batch_major) {
  const auto dims = xs.dimensions();
  const int T = static_cast<int>(dims[batch_major ? 1 : 0]), B = static_cast<int>(dims[batch_major ? 0 : 1]);
  const int I = static_cast<int>(dims[2]), H = static_cast<int>(h0.dimensions()[1]);
  if (auto e = check(cell, H); e.failure()) return e;
  const int G = gates_of(cell), GH = G * H;
  const bool gru = cell == kGru;
  const std::vector<float> zeros(H, 0.f);
  const WeightGradArgs a{xs.typed_data(), ys.typed_data(), h0.typed_data(), dpx.typed_data(),
                         gru ? dghn.typed_data() : nullptr, {ptr_or_null(lengths), ptr_or_null(resets), T, B},
                         zeros.data(), T, B, I, H, G, reverse, {T, B, batch_major}};
  const size_t n = (static_cast<size_t>(I) + H + 1) * GH + (gru ? H : 0);  // floats of one partial
  std::vector<float> second(n);
  const WeightGradOut first{dw_x->typed_data(), dw_h->typed_data(), db->typed_data(), out_or_null(db_hn)};
  const WeightGradOut other{second.data(), second.data() + static_cast<size_t>(I) * GH,
                            second.data() + static_cast<size_t>(I + H) * GH,
                            gru ? second.data() + static_cast<size_t>(I + H + 1) * GH : nullptr};
  const int64_t R = static_cast<int64_t>(T) * B, half = R / 2;
  // a helper where the GEMM has 64 forward steps' worth of work (2^25 flops)
  const int helpers = helpers_for(threads, int64_t{2} * R * (I + H) * GH / 64);
  Team::run(1, 2, helpers, &pool, [&](int, int part) {
    weight_grads_part(a, part ? half : 0, part ? R : half, part ? other : first);
  });
  const auto add_to = [](float* dst, const float* src, size_t count) {
    for (size_t j = 0; j < count; j += kU) st(dst + j, add(ld(dst + j), ld(src + j)));
  };
  add_to(first.dw_x, other.dw_x, static_cast<size_t>(I) * GH);
  add_to(first.dw_h, other.dw_h, static_cast<size_t>(H) * GH);
  add_to(first.db, other.db, GH);
  if (gru) add_to(first.db_hn, other.db_hn, H);
  return ffi::Error::Success();
}

}  // namespace

// The exported handlers: SeqjaxAvx2RnnForward/Backward, or SeqjaxAvx512RnnForward/Backward.
#if defined(SEQJAX_AVX512)
#define SEQJAX_SYMBOL(pass) SeqjaxAvx512Rnn##pass
#else
#define SEQJAX_SYMBOL(pass) SeqjaxAvx2Rnn##pass
#endif

XLA_FFI_DEFINE_HANDLER_SYMBOL(SEQJAX_SYMBOL(Forward), ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_hn [H] (GRU), peep [3, H] (peephole LSTM), or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths [B], or [0]: none
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // resets [T, B], or [0]: none
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ys
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hT
                                  .Ret<ffi::Buffer<ffi::F32>>()  // cT
                                  .Ret<ffi::Buffer<ffi::F32>>()  // act
                                  .Ret<ffi::Buffer<ffi::F32>>()  // aux
                                  .Attr<int64_t>("cell")
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("batch_major"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SEQJAX_SYMBOL(Backward), BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dhT
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dcT
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // act
                                  .Arg<ffi::Buffer<ffi::F32>>()  // aux
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // resets
                                  .Arg<ffi::Buffer<ffi::F32>>()  // peep [3, H] (peephole LSTM) or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dpx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dghn
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dc0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dpeep [B, 3H] (peephole LSTM) or [0]
                                  .Attr<int64_t>("cell")
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("batch_major"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SEQJAX_SYMBOL(WeightGrads), WeightGradsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xs
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dpx
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dghn
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // resets
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_x
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_h
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db_hn
                                  .Attr<int64_t>("cell")
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("batch_major"));
