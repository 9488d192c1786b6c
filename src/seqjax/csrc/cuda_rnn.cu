// Persistent recurrent kernels for Hopper GPUs (sm_90: H100, H200) as XLA FFI handlers for seqjax.cuda:
// the standard LSTM, the GRU (reset_after, PyTorch's and cuDNN's form) and the tanh/relu Elman RNN.
//
// One kernel runs the whole time loop. Its CS blocks form one thread-block cluster; block r owns
// U = H / CS hidden units and keeps its slice of the recurrent weights, the G gate columns of its units
// (w_h[:, cols], H x G*U floats), in registers for the whole sequence.
//
// * Forward, every step: each block multiplies the full h_{t-1} (in its shared memory) by its slice,
//   applies the gate arithmetic to its units, and copies its part of h_t into the shared memory of every
//   block of the cluster (distributed shared memory, one bulk copy per block). Each block waits on its
//   own mbarrier for exactly the bytes it needs; no cluster-wide barrier runs per step.
// * Backward, every step: each block turns dh_t of its units into the gate gradients dA_t, multiplies its
//   columns of dA_t by its slice transposed (a partial dA_t W_h^T over all H outputs), and sends each
//   block the partial sums of that block's units, which the block adds up: a reduce-scatter instead of
//   the forward's all-gather, with the same weight slice.
//
// The input projection x W_x + b of all steps (px) and the weight gradients stay GEMMs in XLA
// (seqjax.cuda). Everything here is float32 and time-major: px [T, B, G*H], h [B, H], ys [T, B, H].
// Gate column blocks are seqjax's: LSTM (i, f, g, o), GRU (r, z, n).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace cg = cooperative_groups;
namespace ffi = xla::ffi;

namespace {

// Must match seqjax.cuda's _CELLS (the numbering of seqjax.onednn; 2, Cho's GRU, is not covered).
enum Cell : int { kLstm = 0, kGru = 1, kRnnTanh = 3, kRnnRelu = 4 };

__host__ __device__ constexpr int gates_of(int cell) { return cell == kLstm ? 4 : cell == kGru ? 3 : 1; }

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// One thread's dot products of R rows with its KPT weights, as R independent FMA chains (a single chain
// would leave the step waiting on FMA latency). Element k of row r is at
// rows + r * stride + (k / seg) * seg_stride + k % seg: the chunk may run over blocks of `seg` floats.
template <int KPT, int R>
__device__ __forceinline__ void dots(const float* rows, int stride, int seg, int seg_stride, const float (&w)[KPT],
                                     float (&acc)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
#pragma unroll
  for (int j = 0; j < KPT / 4; ++j) {
    const int off = (4 * j / seg) * seg_stride + (4 * j) % seg;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float4 v = *reinterpret_cast<const float4*>(rows + r * stride + off);
      acc[r] = fmaf(v.x, w[4 * j], acc[r]);
      acc[r] = fmaf(v.y, w[4 * j + 1], acc[r]);
      acc[r] = fmaf(v.z, w[4 * j + 2], acc[r]);
      acc[r] = fmaf(v.w, w[4 * j + 3], acc[r]);
    }
  }
}

// out[b * out_stride] = (row b of `dots`) . w for b < B, eight rows at a time.
template <int KPT>
__device__ __forceinline__ void matvec_rows(const float* rows, int stride, int seg, int seg_stride, int B,
                                            const float (&w)[KPT], float* out, int out_stride) {
  int b = 0;
  for (; b + 8 <= B; b += 8) {
    float acc[8];
    dots<KPT, 8>(rows + b * stride, stride, seg, seg_stride, w, acc);
#pragma unroll
    for (int r = 0; r < 8; ++r) out[(b + r) * out_stride] = acc[r];
  }
  for (; b < B; ++b) {
    float acc[1];
    dots<KPT, 1>(rows + b * stride, stride, seg, seg_stride, w, acc);
    out[b * out_stride] = acc[0];
  }
}

// ------------------------------------------------------------------ cluster messaging (sm_90 PTX)
// A step's data travels as one bulk copy (cp.async.bulk) per receiving block, from the sender's shared
// memory into the receiver's; each copy counts its bytes off the receiver's mbarrier of that buffer slot,
// so a block waits for exactly its inputs and no cluster-wide barrier (whose release semantics would
// also wait for every global store) runs per step.

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bar)) : "memory");
}

// Arms the barrier's current phase: one arrival plus `bytes` of incoming st.async data.
__device__ __forceinline__ void mbar_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

// The address of `local` (a shared-memory address of this block) in block `rank` of the cluster.
__device__ __forceinline__ uint32_t remote(uint32_t local, int rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(local), "r"(rank));
  return out;
}

// Copies `bytes` (a multiple of 16) from this block's shared memory at `src` to `dst` in another block
// (a cluster address), completing them on that block's barrier `dst_bar`. One thread issues it, after a
// fence.proxy.async by the threads that wrote `src` and a __syncthreads.
__device__ __forceinline__ void send_bulk(uint32_t dst, const float* src, uint32_t bytes, uint32_t dst_bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
      "r"(smem_u32(src)), "r"(bytes), "r"(dst_bar)
      : "memory");
}

__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Waits until this thread's bulk copies have read their sources (before the sources are overwritten).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }

// Makes this thread's shared-memory writes visible to bulk copies issued after a __syncthreads.
__device__ __forceinline__ void fence_to_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// The two buffer slots' barriers: slot s & 1 receives the data step s reads (s >= 1; step 0 reads local
// data). Phase k of a slot serves step 2k + 1 or 2k + 2, so step s waits for parity ((s - 1) >> 1) & 1.
// `last`: the last step that reads received data. Call from every thread; ends with a cluster barrier.
__device__ __forceinline__ void init_slots(cg::cluster_group& cluster, uint64_t* bar, uint32_t bytes, int last) {
  if (threadIdx.x == 0) {
    mbar_init(&bar[0]);
    mbar_init(&bar[1]);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    if (last >= 1) mbar_expect(&bar[1], bytes);
    if (last >= 2) mbar_expect(&bar[0], bytes);
  }
  cluster.sync();
}

// Waits for step s's data (s >= 1) and re-arms the slot for step s + 2. No block can send step s + 2's
// data before this block sends its step s + 1 data, which comes after this wait.
__device__ __forceinline__ void receive(uint64_t* bar, int s, uint32_t bytes, int last) {
  mbar_wait(&bar[s & 1], ((s - 1) >> 1) & 1);
  if (threadIdx.x == 0 && s + 2 <= last) mbar_expect(&bar[s & 1], bytes);
}

struct ForwardArgs {
  const float* px;    // [T, B, G*H]: x_t W_x + b
  const float* w_h;   // [H, G*H]
  const float* b_hn;  // [H] (GRU) or null
  const float* h0;    // [B, H]
  const float* c0;    // [B, H] (LSTM) or null
  float* ys;          // [T, B, H]
  float* hT;          // [B, H]
  float* cT;          // [B, H] (LSTM) or null
  float* act;         // [T, B, G*H] the activated gates (training), or null
  float* aux;         // [T, B, H] LSTM: c_t, GRU: W_hn h_{t-1} + b_hn (training), or null
  int T, B, H, reverse;
};

// Shared memory: bar [2] (mbarriers, one float4), hbuf [2][CS][B][U] (h_{t-1} and h_t, blocked by the
// block owning the units, so each block's slice arrives as one copy), part [KC][B][G*U] (k-chunk partial
// sums), hloc [B][U] (this block's slice of h_t, the copies' source).
template <int CELL, int KPT>
__global__ void forward_kernel(ForwardArgs a) {
  constexpr int G = gates_of(CELL);
  cg::cluster_group cluster = cg::this_cluster();
  const int CS = cluster.num_blocks(), r = cluster.block_rank();
  const int B = a.B, H = a.H, GH = G * H, U = H / CS, N = G * U, KC = H / KPT, u0 = r * U;
  const int tid = threadIdx.x;
  extern __shared__ float4 smem4[];
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem4);
  float* hbuf = reinterpret_cast<float*>(smem4 + 1);
  float* part = hbuf + 2 * B * H;
  float* hloc = part + KC * B * N;

  // matmul role: output column n of the block (gate n / U of unit u0 + n % U), rows kc*KPT .. +KPT of w_h
  const int n = tid % N, kc = tid / N;
  const bool mm = kc < KC;
  float w[KPT];
  if (mm) {
    const int col = (n / U) * H + u0 + n % U;
#pragma unroll
    for (int j = 0; j < KPT; ++j) w[j] = a.w_h[static_cast<size_t>(kc * KPT + j) * GH + col];
  }
  // gate role: batch row gb, unit u0 + gu
  const bool gate = tid < B * U;
  const int gb = gate ? tid / U : 0, gu = tid % U, unit = u0 + gu;
  float h = gate ? a.h0[gb * H + unit] : 0.f;
  float c = (CELL == kLstm && gate) ? a.c0[gb * H + unit] : 0.f;
  const float bhn = (CELL == kGru && gate) ? a.b_hn[unit] : 0.f;
  for (int i = tid; i < B * H; i += blockDim.x) {  // h0 [B, H] -> [CS][B][U]
    const int b = i / H, k = i % H;
    hbuf[((k / U) * B + b) * U + k % U] = a.h0[i];
  }
  const uint32_t bytes = static_cast<uint32_t>(B * H * sizeof(float));
  const int last = a.T - 1;
  init_slots(cluster, bar, bytes, last);

  auto load_px = [&](int s, float (&dst)[G]) {
    if (!gate || s >= a.T) return;
    const int t = a.reverse ? a.T - 1 - s : s;
    const float* p = a.px + (static_cast<size_t>(t) * B + gb) * GH + unit;
#pragma unroll
    for (int g = 0; g < G; ++g) dst[g] = __ldg(p + g * H);
  };
  // One step: `use` holds px_t (loaded a step earlier), `fill` receives px_{t+1}.
  auto step = [&](int s, float (&use)[G], float (&fill)[G]) {
    const int t = a.reverse ? a.T - 1 - s : s;
    load_px(s + 1, fill);
    if (s > 0) receive(bar, s, bytes, last);
    if (tid < CS) bulk_wait_read();  // this thread's copies of the last step have read hloc
    const float* hc = hbuf + (s & 1) * B * H;
    if (mm) {
      const int k0 = kc * KPT;
      matvec_rows<KPT>(hc + (k0 / U) * B * U + k0 % U, U, U, B * U, B, w, part + kc * B * N + n, N);
    }
    __syncthreads();
    if (gate) {
      float pre[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float sum = (CELL == kGru && g == 2) ? 0.f : use[g];  // the GRU's reset gate scales only h W_hn
        for (int k = 0; k < KC; ++k) sum += part[(k * B + gb) * N + g * U + gu];
        pre[g] = sum;
      }
      const size_t row = static_cast<size_t>(t) * B + gb;
      if constexpr (CELL == kLstm) {
        const float i = sigmoid(pre[0]), f = sigmoid(pre[1]), g = tanhf(pre[2]), o = sigmoid(pre[3]);
        c = f * c + i * g;
        h = o * tanhf(c);
        if (a.act) {
          float* q = a.act + row * GH + unit;
          q[0] = i, q[H] = f, q[2 * H] = g, q[3 * H] = o;
          a.aux[row * H + unit] = c;
        }
      } else if constexpr (CELL == kGru) {
        const float rg = sigmoid(pre[0]), z = sigmoid(pre[1]);
        const float hn = pre[2] + bhn, nn = tanhf(use[2] + rg * hn);
        h = (1.f - z) * nn + z * h;
        if (a.act) {
          float* q = a.act + row * GH + unit;
          q[0] = rg, q[H] = z, q[2 * H] = nn;
          a.aux[row * H + unit] = hn;
        }
      } else {
        h = CELL == kRnnTanh ? tanhf(pre[0]) : fmaxf(pre[0], 0.f);
      }
      a.ys[row * H + unit] = h;
      hloc[gb * U + gu] = h;
      fence_to_async();
    }
    __syncthreads();
    if (s < last && tid < CS) {  // all-gather h_t: thread rr copies this block's [B, U] slice to block rr
      const uint32_t dst = smem_u32(hbuf + ((s + 1) & 1) * B * H + r * B * U);
      send_bulk(remote(dst, tid), hloc, static_cast<uint32_t>(B * U * sizeof(float)),
                remote(smem_u32(&bar[(s + 1) & 1]), tid));
      bulk_commit();
    }
  };
  float pa[G], pb[G];
  load_px(0, pa);
  for (int s = 0; s < a.T; s += 2) {
    step(s, pa, pb);
    if (s + 1 < a.T) step(s + 1, pb, pa);
  }
  if (gate) {
    a.hT[gb * H + unit] = h;
    if (CELL == kLstm) a.cT[gb * H + unit] = c;
  }
  cluster.sync();  // no block leaves while another may still write into its shared memory
}

struct BackwardArgs {
  const float* dys;  // [T, B, H]
  const float* dhT;  // [B, H]
  const float* dcT;  // [B, H] (LSTM) or null
  const float* w_h;  // [H, G*H]
  const float* ys;   // [T, B, H]
  const float* h0;   // [B, H]
  const float* c0;   // [B, H] (LSTM) or null
  const float* act;  // [T, B, G*H] from the forward kernel (LSTM, GRU) or null
  const float* aux;  // [T, B, H] from the forward kernel (LSTM, GRU) or null
  float* dpx;        // [T, B, G*H]: the gradient of px
  float* dghn;       // [T, B, H] (GRU): the gradient of W_hn h_{t-1} + b_hn, or null
  float* dh0;        // [B, H]
  float* dc0;        // [B, H] (LSTM) or null
  int T, B, H, reverse;
};

// One step's inputs of a gate thread, loaded a step ahead.
template <int G>
struct StepIn {
  float dy, act[G], aux, prev;  // prev: LSTM c_{t-1}, GRU h_{t-1}; aux: RNN h_t
};

// Shared memory: bar [2] (one float4), rbuf [2][CS][B][U] (partial dh from every block), dloc [B][G*U]
// (own dA_t), part [KC][B][H] (k-chunk partial sums of dA_t W_h^T), sbuf [CS][B][U] (the sums, blocked by
// receiving block: the copies' sources).
template <int CELL, int KPT>
__global__ void backward_kernel(BackwardArgs a) {
  constexpr int G = gates_of(CELL);
  cg::cluster_group cluster = cg::this_cluster();
  const int CS = cluster.num_blocks(), r = cluster.block_rank();
  const int B = a.B, H = a.H, GH = G * H, U = H / CS, N = G * U, KC = N / KPT, u0 = r * U;
  const int tid = threadIdx.x;
  extern __shared__ float4 smem4[];
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem4);
  float* rbuf = reinterpret_cast<float*>(smem4 + 1);
  float* dloc = rbuf + 2 * CS * B * U;
  float* part = dloc + B * N;
  float* sbuf = part + KC * B * H;

  // matmul role: output j (all H units), own gate columns kc*KPT .. +KPT
  const int j = tid % H, kc = tid / H;
  const bool mm = kc < KC;
  float w[KPT];
  if (mm) {
#pragma unroll
    for (int q = 0; q < KPT; ++q) {
      const int n = kc * KPT + q;
      w[q] = a.w_h[static_cast<size_t>(j) * GH + (n / U) * H + u0 + n % U];
    }
  }
  const bool gate = tid < B * U;
  const int gb = gate ? tid / U : 0, gu = tid % U, unit = u0 + gu;
  float dh_in = gate ? a.dhT[gb * H + unit] : 0.f;  // the gradient reaching h_t from step t+1
  float dc = (CELL == kLstm && gate) ? a.dcT[gb * H + unit] : 0.f;
  float dhz = 0.f;  // GRU: dh_t * z_t, the direct path to h_{t-1}
  const uint32_t bytes = static_cast<uint32_t>(B * H * sizeof(float));
  const int last = a.T;  // step T's data: the gradient reaching h0
  init_slots(cluster, bar, bytes, last);

  auto load = [&](int s, StepIn<G>& in) {
    if (!gate || s >= a.T) return;
    const int t = a.reverse ? s : a.T - 1 - s;  // backward visits the forward order in reverse
    const int tp = a.reverse ? t + 1 : t - 1;   // the step before t in the forward order
    const bool first = tp < 0 || tp >= a.T;
    const size_t row = static_cast<size_t>(t) * B + gb, prow = static_cast<size_t>(tp) * B + gb;
    in.dy = __ldg(a.dys + row * H + unit);
    if constexpr (CELL == kLstm || CELL == kGru) {
#pragma unroll
      for (int g = 0; g < G; ++g) in.act[g] = __ldg(a.act + row * GH + g * H + unit);
      in.aux = __ldg(a.aux + row * H + unit);
      if constexpr (CELL == kLstm) {
        in.prev = first ? a.c0[gb * H + unit] : __ldg(a.aux + prow * H + unit);
      } else {
        in.prev = first ? a.h0[gb * H + unit] : __ldg(a.ys + prow * H + unit);
      }
    } else {
      in.aux = __ldg(a.ys + row * H + unit);
    }
  };
  auto received = [&](int s) {  // the sum of the partial dh every block sent for step s
    const float* in = rbuf + (s & 1) * CS * B * U;
    float sum = 0.f;
    for (int rr = 0; rr < CS; ++rr) sum += in[(rr * B + gb) * U + gu];
    return sum;
  };
  auto step = [&](int s, StepIn<G>& cur, StepIn<G>& nxt) {
    const int t = a.reverse ? s : a.T - 1 - s;
    load(s + 1, nxt);
    if (s > 0) receive(bar, s, bytes, last);
    if (tid < CS) bulk_wait_read();  // this thread's copies of the last step have read sbuf
    if (gate) {
      if (s > 0) dh_in = received(s);
      const float dh = dh_in + dhz + cur.dy;
      float d[G];  // the gradient of the gates' pre-activations, as the recurrent GEMM saw them
      const size_t row = static_cast<size_t>(t) * B + gb;
      float* dpx = a.dpx + row * GH + unit;
      if constexpr (CELL == kLstm) {
        const float i = cur.act[0], f = cur.act[1], g = cur.act[2], o = cur.act[3];
        const float tc = tanhf(cur.aux);
        const float dcc = dc + dh * o * (1.f - tc * tc);
        d[0] = dcc * g * i * (1.f - i);
        d[1] = dcc * cur.prev * f * (1.f - f);
        d[2] = dcc * i * (1.f - g * g);
        d[3] = dh * tc * o * (1.f - o);
        dc = dcc * f;
#pragma unroll
        for (int q = 0; q < 4; ++q) dpx[q * H] = d[q];
      } else if constexpr (CELL == kGru) {
        const float rg = cur.act[0], z = cur.act[1], nn = cur.act[2];
        const float dn = dh * (1.f - z) * (1.f - nn * nn);
        d[1] = dh * (cur.prev - nn) * z * (1.f - z);
        d[0] = dn * cur.aux * rg * (1.f - rg);
        d[2] = dn * rg;
        dhz = dh * z;
        dpx[0] = d[0], dpx[H] = d[1], dpx[2 * H] = dn;
        a.dghn[row * H + unit] = d[2];
      } else {
        const float y = cur.aux;
        d[0] = dh * (CELL == kRnnTanh ? 1.f - y * y : (y > 0.f ? 1.f : 0.f));
        dpx[0] = d[0];
      }
#pragma unroll
      for (int g = 0; g < G; ++g) dloc[gb * N + g * U + gu] = d[g];
    }
    __syncthreads();
    if (mm) {
      matvec_rows<KPT>(dloc + kc * KPT, N, N, 0, B, w, part + kc * B * H + j, H);
    }
    __syncthreads();
    // reduce-scatter: the sums over k-chunks for block rr's units go to sbuf[rr], then to slot [s+1][r] of rr
    for (int i = tid; i < B * H / 4; i += blockDim.x) {
      const int b = i / (H / 4), k = 4 * (i % (H / 4));
      float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int q = 0; q < KC; ++q) {
        const float4 v = *reinterpret_cast<const float4*>(part + (q * B + b) * H + k);
        sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
      }
      *reinterpret_cast<float4*>(sbuf + ((k / U) * B + b) * U + k % U) = sum;
    }
    fence_to_async();
    __syncthreads();
    if (tid < CS) {
      const uint32_t dst = smem_u32(rbuf + ((s + 1) & 1) * CS * B * U + r * B * U);
      send_bulk(remote(dst, tid), sbuf + tid * B * U, static_cast<uint32_t>(B * U * sizeof(float)),
                remote(smem_u32(&bar[(s + 1) & 1]), tid));
      bulk_commit();
    }
  };
  StepIn<G> sa, sb;
  load(0, sa);
  for (int s = 0; s < a.T; s += 2) {
    step(s, sa, sb);
    if (s + 1 < a.T) step(s + 1, sb, sa);
  }
  if (a.T > 0) receive(bar, a.T, bytes, last);
  if (gate) {
    if (a.T > 0) dh_in = received(a.T);
    a.dh0[gb * H + unit] = dh_in + dhz;
    if (CELL == kLstm) a.dc0[gb * H + unit] = dc;
  }
  cluster.sync();  // no block leaves while another may still write into its shared memory
}

// ------------------------------------------------------------------------------------------ launch plans

struct Plan {
  int cs, fwd_kpt, fwd_threads, bwd_kpt, bwd_threads;
  size_t fwd_smem, bwd_smem;
};

using Kernel = void*;

template <int CELL>
Kernel forward_of(int kpt) {
  switch (kpt) {
    case 4: return reinterpret_cast<Kernel>(&forward_kernel<CELL, 4>);
    case 8: return reinterpret_cast<Kernel>(&forward_kernel<CELL, 8>);
    case 16: return reinterpret_cast<Kernel>(&forward_kernel<CELL, 16>);
    case 32: return reinterpret_cast<Kernel>(&forward_kernel<CELL, 32>);
    case 64: return reinterpret_cast<Kernel>(&forward_kernel<CELL, 64>);
  }
  return nullptr;
}

template <int CELL>
Kernel backward_of(int kpt) {
  switch (kpt) {
    case 4: return reinterpret_cast<Kernel>(&backward_kernel<CELL, 4>);
    case 8: return reinterpret_cast<Kernel>(&backward_kernel<CELL, 8>);
    case 16: return reinterpret_cast<Kernel>(&backward_kernel<CELL, 16>);
    case 32: return reinterpret_cast<Kernel>(&backward_kernel<CELL, 32>);
    case 48: return reinterpret_cast<Kernel>(&backward_kernel<CELL, 48>);
    case 64: return reinterpret_cast<Kernel>(&backward_kernel<CELL, 64>);
  }
  return nullptr;
}

Kernel kernel_of(int cell, bool forward, int kpt) {
  switch (cell) {
    case kLstm: return forward ? forward_of<kLstm>(kpt) : backward_of<kLstm>(kpt);
    case kGru: return forward ? forward_of<kGru>(kpt) : backward_of<kGru>(kpt);
    case kRnnTanh: return forward ? forward_of<kRnnTanh>(kpt) : backward_of<kRnnTanh>(kpt);
    case kRnnRelu: return forward ? forward_of<kRnnRelu>(kpt) : backward_of<kRnnRelu>(kpt);
  }
  return nullptr;
}

int round_up32(int x) { return (x + 31) / 32 * 32; }

// Sets the kernel's attributes for `smem` bytes and cluster size `cs`; fills `cfg` for a launch of one cluster.
cudaError_t configure(Kernel kern, int cs, int threads, size_t smem, cudaStream_t stream, cudaLaunchConfig_t* cfg,
                      cudaLaunchAttribute* attr) {
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e == cudaSuccess) e = cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  *cfg = cudaLaunchConfig_t{};
  cfg->gridDim = dim3(cs);
  cfg->blockDim = dim3(threads);
  cfg->dynamicSmemBytes = smem;
  cfg->stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = cs;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg->attrs = attr;
  cfg->numAttrs = 1;
  return e;
}

// Whether one cluster of `kern` with this configuration fits on the device.
bool launchable(Kernel kern, int cs, int threads, size_t smem, std::string* why) {
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr;
  cudaError_t e = configure(kern, cs, threads, smem, nullptr, &cfg, &attr);
  int clusters = 0;
  if (e == cudaSuccess) e = cudaOccupancyMaxActiveClusters(&clusters, kern, &cfg);
  if (e != cudaSuccess || clusters < 1) {
    *why = "a cluster of " + std::to_string(cs) + " blocks of " + std::to_string(threads) + " threads with " +
           std::to_string(smem) + " bytes of shared memory does not fit" +
           (e != cudaSuccess ? std::string(" (") + cudaGetErrorString(e) + ")" : std::string());
    cudaGetLastError();  // clear the sticky-free error state for the next try
    return false;
  }
  return true;
}

// One kernel's launch: k-chunk, threads per block, shared-memory bytes.
struct Side {
  int kpt, threads;
  size_t smem;
};

// The first launchable k-chunk for the forward (`forward`) or backward kernel of a cluster of `cs` blocks.
// Order: the chunks whose matmul fits in `target` threads, smallest first (most threads), then the
// others, largest first (fewest threads); the forward's chunk of 4 comes last. A forward chunk must lie in one block of U units of the
// blocked h or span whole blocks.
// What the planner asks of the GPU: its compute capability, shared memory per block and whether a
// launch configuration fits (`launchable`, or a model of it for testing the planner without a GPU).
struct Device {
  int major, smem_max;
  bool (*fits)(int cell, bool forward, int kpt, int cs, int threads, size_t smem, std::string* why);
};

bool fits_on_gpu(int cell, bool forward, int kpt, int cs, int threads, size_t smem, std::string* why) {
  return launchable(kernel_of(cell, forward, kpt), cs, threads, smem, why);
}

Device this_gpu() {
  int device = 0, major = 0, smem_max = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaGetLastError();  // no GPU: major stays 0 and the planner says so
  return Device{major, smem_max, &fits_on_gpu};
}

bool choose(const Device& dev, int cell, bool forward, int cs, int B, int H, int target, Side* out,
            std::string* why) {
  const int G = gates_of(cell), U = H / cs, N = G * U;
  const int k = forward ? H : N, outputs = forward ? N : H;
  const std::vector<int> options = forward ? std::vector<int>{8, 16, 32, 64} : std::vector<int>{4, 8, 16, 32, 48, 64};
  std::vector<int> order, rest;
  for (int kpt : options) {
    if (k % kpt || (forward && U % kpt && kpt % U)) continue;
    (outputs * (k / kpt) <= target ? order : rest).push_back(kpt);
  }
  order.insert(order.end(), rest.rbegin(), rest.rend());
  if (forward) order.push_back(4);  // last resort (H = 4): the benchmarked plans never needed it
  const int smem_max = dev.smem_max;
  if (order.empty()) *why = "no k-chunk of " + std::to_string(k) + " fits the " + (forward ? "forward" : "backward");
  for (int kpt : order) {
    const int KC = k / kpt;
    Side side{kpt, round_up32(std::max(outputs * KC, B * U)),
              16 + sizeof(float) * (forward ? 2 * B * H + KC * B * N + B * U : 3 * B * H + B * N + KC * B * H)};
    if (side.threads > 1024) {
      *why = std::to_string(side.threads) + " threads per block";
      continue;
    }
    if (side.smem > static_cast<size_t>(smem_max)) {
      *why = std::to_string(side.smem) + " bytes of shared memory per block, " + std::to_string(smem_max) +
             " available";
      continue;
    }
    if (dev.fits(cell, forward, kpt, cs, side.threads, side.smem, why)) {
      *out = side;
      return true;
    }
  }
  return false;
}

// Chooses the cluster size and thread layout for (cell, B, H); cs_request 0 = automatic, threads =
// target threads per block for the matmuls (0 = 256). Returns false with `why` if nothing fits.
bool make_plan(const Device& dev, int cell, int B, int H, int cs_request, int threads, Plan* plan,
               std::string* why) {
  if (cell != kLstm && cell != kGru && cell != kRnnTanh && cell != kRnnRelu) {
    *why = "unknown cell " + std::to_string(cell);
    return false;
  }
  const int major = dev.major;
  if (B < 1 || H < 1) {
    *why = "B=" + std::to_string(B) + " and H=" + std::to_string(H) + " must be positive";
    return false;
  }
  if (major < 9) {
    *why = "thread-block clusters need compute capability 9.0 or newer (Hopper), this GPU has " +
           std::to_string(major) + ".x";
    return false;
  }
  const int target = threads > 0 ? threads : 256;
  std::string last = "no cluster size divides H=" + std::to_string(H) + " into blocks of a multiple of 4 units";
  std::string first;
  for (int cs : {16, 8, 4, 2, 1}) {
    if (cs_request > 0 && cs != cs_request) continue;
    if (H % (4 * cs)) continue;
    const int U = H / cs;
    // a failure is reported for the largest cluster tried, the one closest to fitting
    if (B * U > 1024) {
      if (first.empty()) first = "B * H / cluster = " + std::to_string(B) + " * " + std::to_string(H) + " / " +
                                 std::to_string(cs) + " gate threads per block, more than 1024";
      continue;
    }
    Side fwd, bwd;
    std::string why_f, why_b;
    if (!choose(dev, cell, true, cs, B, H, target, &fwd, &why_f) ||
        !choose(dev, cell, false, cs, B, H, target, &bwd, &why_b)) {
      if (first.empty())
        first = "cluster of " + std::to_string(cs) + ": " + (why_f.empty() ? "" : "forward: " + why_f + "; ") +
                (why_b.empty() ? "" : "backward: " + why_b);
      continue;
    }
    *plan = Plan{cs, fwd.kpt, fwd.threads, bwd.kpt, bwd.threads, fwd.smem, bwd.smem};
    return true;
  }
  *why = first.empty() ? last : first;
  return false;
}

ffi::Error launch(Kernel kern, int cs, int threads, size_t smem, cudaStream_t stream, void* args) {
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr;
  cudaError_t e = configure(kern, cs, threads, smem, stream, &cfg, &attr);
  if (e == cudaSuccess) {
    void* params[] = {args};
    e = cudaLaunchKernelExC(&cfg, kern, params);
  }
  if (e != cudaSuccess) return ffi::Error(ffi::ErrorCode::kInternal, std::string("seqjax cuda: ") + cudaGetErrorString(e));
  return ffi::Error::Success();
}

template <typename Buf>
const float* ptr_or_null(const Buf& b) {
  return b.element_count() ? b.typed_data() : nullptr;
}
template <typename Buf>
float* out_or_null(Buf& b) {
  return b->element_count() ? b->typed_data() : nullptr;
}

// make_plan, cached: a handler asks on every call, and the occupancy queries cost more than the launch.
ffi::Error plan_for(int64_t cell, int B, int H, int64_t cluster, int64_t threads, Plan* plan) {
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, int, int, int64_t, int64_t>, Plan> plans;
  const auto key = std::make_tuple(cell, B, H, cluster, threads);
  std::lock_guard<std::mutex> lock(mutex);
  if (auto found = plans.find(key); found != plans.end()) {
    *plan = found->second;
    return ffi::Error::Success();
  }
  std::string why;
  if (!make_plan(this_gpu(), static_cast<int>(cell), B, H, static_cast<int>(cluster), static_cast<int>(threads), plan,
                 &why))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "seqjax cuda: no launch plan: " + why);
  plans.emplace(key, *plan);
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> px, ffi::Buffer<ffi::F32> w_h,
                       ffi::Buffer<ffi::F32> b_hn, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                       ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> hT,
                       ffi::ResultBuffer<ffi::F32> cT, ffi::ResultBuffer<ffi::F32> act,
                       ffi::ResultBuffer<ffi::F32> aux, int64_t cell, bool reverse, int64_t cluster,
                       int64_t threads) {
  const auto dims = px.dimensions();
  ForwardArgs a{px.typed_data(), w_h.typed_data(), ptr_or_null(b_hn), h0.typed_data(), ptr_or_null(c0),
                ys->typed_data(), hT->typed_data(), out_or_null(cT), out_or_null(act), out_or_null(aux),
                static_cast<int>(dims[0]), static_cast<int>(dims[1]), static_cast<int>(h0.dimensions()[1]),
                reverse ? 1 : 0};
  Plan p;
  if (auto e = plan_for(cell, a.B, a.H, cluster, threads, &p); e.failure()) return e;
  return launch(kernel_of(static_cast<int>(cell), true, p.fwd_kpt), p.cs, p.fwd_threads, p.fwd_smem, stream, &a);
}

ffi::Error BackwardImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> dys, ffi::Buffer<ffi::F32> dhT,
                        ffi::Buffer<ffi::F32> dcT, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> ys,
                        ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::F32> act,
                        ffi::Buffer<ffi::F32> aux, ffi::ResultBuffer<ffi::F32> dpx,
                        ffi::ResultBuffer<ffi::F32> dghn, ffi::ResultBuffer<ffi::F32> dh0,
                        ffi::ResultBuffer<ffi::F32> dc0, int64_t cell, bool reverse, int64_t cluster,
                        int64_t threads) {
  const auto dims = dys.dimensions();
  BackwardArgs a{dys.typed_data(), dhT.typed_data(), ptr_or_null(dcT), w_h.typed_data(), ys.typed_data(),
                 h0.typed_data(), ptr_or_null(c0), ptr_or_null(act), ptr_or_null(aux), dpx->typed_data(),
                 out_or_null(dghn), dh0->typed_data(), out_or_null(dc0), static_cast<int>(dims[0]),
                 static_cast<int>(dims[1]), static_cast<int>(dims[2]), reverse ? 1 : 0};
  Plan p;
  if (auto e = plan_for(cell, a.B, a.H, cluster, threads, &p); e.failure()) return e;
  return launch(kernel_of(static_cast<int>(cell), false, p.bwd_kpt), p.cs, p.bwd_threads, p.bwd_smem, stream, &a);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxCudaRnnForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // px
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_hn
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ys
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hT
                                  .Ret<ffi::Buffer<ffi::F32>>()  // cT
                                  .Ret<ffi::Buffer<ffi::F32>>()  // act
                                  .Ret<ffi::Buffer<ffi::F32>>()  // aux
                                  .Attr<int64_t>("cell")
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("cluster")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxCudaRnnBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dhT
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dcT
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // act
                                  .Arg<ffi::Buffer<ffi::F32>>()  // aux
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dpx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dghn
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dc0
                                  .Attr<int64_t>("cell")
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("cluster")
                                  .Attr<int64_t>("threads"));

namespace {

int write_plan(bool ok, const Plan& p, const std::string& why, int64_t* out, char* error, int64_t len) {
  if (!ok) {
    std::snprintf(error, static_cast<size_t>(len), "%s", why.c_str());
    return -1;
  }
  out[0] = p.cs, out[1] = p.fwd_threads, out[2] = p.bwd_threads;
  out[3] = static_cast<int64_t>(p.fwd_smem), out[4] = static_cast<int64_t>(p.bwd_smem);
  return 0;
}

bool fits_in_model(int, bool, int, int, int threads, size_t, std::string* why) {
  if (threads <= 512) return true;  // the model: 64K registers, up to 128 per thread
  *why = std::to_string(threads) + " threads per block over the model's 512";
  return false;
}

}  // namespace

// The launch plan seqjax.cuda checks at trace time: fills out[0..4] = cluster size, forward threads,
// backward threads, forward and backward shared-memory bytes and returns 0, or returns -1 with the reason
// in `error` (at most `len` bytes, NUL-terminated).
extern "C" int seqjax_cuda_plan(int cell, int B, int H, int cluster, int threads, int64_t* out, char* error,
                                int64_t len) {
  Plan p;
  std::string why;
  const bool ok = make_plan(this_gpu(), cell, B, H, cluster, threads, &p, &why);
  return write_plan(ok, p, why, out, error, len);
}

// The same planner for a model Hopper GPU (227 KB of shared memory per block, launchable up to 512
// threads), so tests can check it without a GPU.
extern "C" int seqjax_cuda_plan_model(int cell, int B, int H, int cluster, int threads, int64_t* out, char* error,
                                      int64_t len) {
  Plan p;
  std::string why;
  const bool ok = make_plan(Device{9, 232448, &fits_in_model}, cell, B, H, cluster, threads, &p, &why);
  return write_plan(ok, p, why, out, error, len);
}
