// What every native kernel shares: the activations in branch-free arithmetic that vectorises,
// and the loop over batch rows split across threads. Included once, by kernels.cpp (one
// translation unit, so that torch's headers are parsed once).

#pragma once

// Only the operators used, not <ATen/ATen.h>: its every-operator headers took most of the
// parse (21 s against 13 s for the whole translation unit on a 2-core EPYC; the build, 48 s
// against 43). An operator missing here is a compile error, not a slow build.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/ParallelGuard.h>
#include <omp.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace morphnas_native {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum Activation : int64_t { kTanh = 0, kSigmoid = 1, kRelu = 2, kIdentity = 3 };

// Cephes' expf (about 1 ulp) in branch-free arithmetic that vectorises, where libm's does not.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
// tanh as 2σ(2x) − 1 in float32, as the Python kernel computes it on CPU (fused_ops.tanh_into).
inline float tanh_value(float x) { return 2.0f * sigmoid(2.0f * x) - 1.0f; }
inline double tanh_value(double x) { return std::tanh(x); }

// tanh(g) and σ(g) from one exp, for a row that needs both (the DARTS activations): with
// e = exp(−g), σ = 1/(1+e) and tanh = (1−e²)/(1+e²), and the two reciprocals from one
// division, r = 1/((1+e)(1+e²)). Half the exps and divisions of computing each alone,
// which bound the supernet's elementwise loops. ``g`` is clamped to ±25 first so that the
// product stays finite in float32; beyond it tanh is ±1 in float32 and σ within 1.4e−11 of 0 or 1.
inline void tanh_and_sigmoid(float g, float& tanh_out, float& sigmoid_out) {
  const float e = exp_approx(-std::min(std::max(g, -25.0f), 25.0f));
  const float q = 1.0f + e, q2 = 1.0f + e * e;
  const float r = 1.0f / (q * q2);
  sigmoid_out = r * q2;
  tanh_out = (1.0f - e) * q * (r * q);  // (1 − e)(1 + e) rather than 2/(1+e²) − 1: exact near 0
}
inline void tanh_and_sigmoid(double g, double& tanh_out, double& sigmoid_out) {
  tanh_out = std::tanh(g);
  sigmoid_out = sigmoid(g);
}

template <int64_t Act, typename T>
inline T activate(T g) {
  if constexpr (Act == kTanh) return tanh_value(g);
  if constexpr (Act == kSigmoid) return sigmoid(g);
  if constexpr (Act == kRelu) return g > T(0) ? g : T(0);
  return g;
}

// f'(g) from the value a = f(g) (relu: a > 0 exactly when g > 0).
template <int64_t Act, typename T>
inline T slope(T a) {
  if constexpr (Act == kTanh) return T(1) - a * a;
  if constexpr (Act == kSigmoid) return a * (T(1) - a);
  if constexpr (Act == kRelu) return a > T(0) ? T(1) : T(0);
  return T(1);
}

// ``body(std::integral_constant<int64_t, act>)``: the activation a compile-time constant, so
// that each loop over a row is branch-free and vectorises.
template <typename F>
void with_activation(int64_t act, const F& body) {
  switch (act) {
    case kTanh: return body(std::integral_constant<int64_t, kTanh>());
    case kSigmoid: return body(std::integral_constant<int64_t, kSigmoid>());
    case kRelu: return body(std::integral_constant<int64_t, kRelu>());
    default: return body(std::integral_constant<int64_t, kIdentity>());
  }
}

// ``body(first, end)`` over batch rows, split across the intra-op threads in chunks of at least
// 2,048 elements. ATen's own grain for elementwise ops is 32,768, but these loops do far more
// per element (exp, every activation): at batch 64 × hidden 64 the DARTS supernet's step took
// 0.097 s on two threads with chunks of 8,192 elements and 0.068 s with 2,048 (one thread:
// 0.108 s), and at batch 256 × hidden 300 it did not change.
template <typename F>
void over_rows(int64_t rows, int64_t row_width, const F& body) {
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(row_width, 1));
  at::parallel_for(0, rows, grain, body);
}

// Partial sums taken per chunk of rows (``over_rows``), merged in the chunks' order rather than
// in the order threads finish them: with the same thread count, the same result every run.
class ChunkSums {
 public:
  void add(int64_t chunk, std::vector<double> part) {
    std::lock_guard<std::mutex> lock(mutex_);
    parts_.emplace(chunk, std::move(part));
  }
  // Adds them into ``total`` (one number per slot of a part), and starts afresh.
  void merge_into(std::vector<double>& total) {
    for (const auto& entry : parts_)
      for (size_t j = 0; j < entry.second.size(); ++j) total[j] += entry.second[j];
    parts_.clear();
  }

 private:
  std::mutex mutex_;
  std::map<int64_t, std::vector<double>> parts_;
};

// Column sums that the threads of ``in_parts``, one part of a batch's rows each, pool at a
// barrier. Each part fills its own slot, then every part adds up all the slots in part order
// (the same result every run). Two sets of slots alternate rounds, so a part may fill its next
// slot while another still reads the last round's: every part has read round r before it
// reaches round r+1's barrier, and round r+2 writes round r's slots only after that barrier.
// The barrier is its own rather than OpenMP's so that a part that failed can break it: the
// others then leave with an error instead of waiting for it forever. A part waiting there spins
// a while (16384 checks, about 13 µs), then sleeps on a futex (``std::atomic::wait``).
// Spinning or yielding on kept its core busy: when another process took the other core, the
// part it had displaced could not move to the waiting part's core, and barriers waited out
// time slices. With one CPU-bound process beside it on 2 cores, the `small` supernet step's
// median went from 804 to 201 ms (552 to 220 when sleeping after 4096 checks); quiet, 61 → 59
// ms, and `darts` 2.89 → 2.78 s. Sleeping sooner (after 512 checks) made `darts` 5–10 %
// slower: its waits are longer, and waking a sleeping part costs more than spinning through a
// short wait.
class PartPool {
 public:
  PartPool(int64_t parts, int64_t width)
      : parts_(parts), width_(width), slots_(2 * parts * width), rounds_(parts, 0) {}

  // Part ``part``'s slot for its current round: ``width`` doubles for it to fill.
  double* slot(int64_t part) { return slots_.data() + (base(part) + part) * width_; }

  // Once every part has filled its slot: their sum into ``total`` (``width`` doubles).
  void total(int64_t part, double* total) {
    wait();
    const double* first = slots_.data() + base(part) * width_;
    std::fill(total, total + width_, 0.0);
    for (int64_t p = 0; p < parts_; ++p)
      for (int64_t j = 0; j < width_; ++j) total[j] += first[p * width_ + j];
    ++rounds_[part];
  }

  // A part failed: the others stop at their next barrier, woken if they sleep there.
  void fail() {
    broken_.store(true, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    generation_.notify_all();
  }

 private:
  int64_t parts_, width_;
  std::vector<double> slots_;
  std::vector<int64_t> rounds_;  // per part, touched by its own thread only
  std::atomic<int64_t> arrived_{0};
  std::atomic<int> generation_{0};  // an int: the width a futex waits on
  std::atomic<bool> broken_{false};

  int64_t base(int64_t part) const { return (rounds_[part] % 2) * parts_; }

  void wait() {
    if (parts_ == 1) return;
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == parts_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      generation_.notify_all();  // no system call unless a part sleeps
      return;
    }
    for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (broken_.load(std::memory_order_relaxed)) break;
      if (spins > 16384) generation_.wait(generation, std::memory_order_acquire);
    }
    if (broken_.load(std::memory_order_relaxed)) throw std::runtime_error("another part failed");
  }
};

// ``body(part)`` for parts 0..parts−1, each on its own thread of one OpenMP team, so that the
// parts may meet at ``pool``'s barriers. One part: called here, and the ``over_rows`` loops
// inside split their rows across threads as usual; more: those loops run whole in their part's
// thread, as do the ATen calls (MKL uses one thread inside a parallel region). Why: at small
// batches the step's hundreds of parallel regions, one per loop and matmul, cost more than the
// barriers of one region (docs/benchmarks.md). An error in a part breaks the pool's barrier and
// is raised here, once every part has stopped; a team smaller than asked for is refused before
// any part starts.
template <typename F>
void in_parts(int64_t parts, PartPool& pool, const F& body) {
  if (parts == 1) {
    body(0);
    return;
  }
  const at::ThreadLocalState state;
  bool whole_team = true;
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel num_threads(parts)
  {
    if (omp_get_num_threads() != parts) {
#pragma omp single
      whole_team = false;
    } else {
      try {
        at::ThreadLocalStateGuard guard(state);
        c10::ParallelGuard in_parallel(true);
        body(omp_get_thread_num());
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();  // the first: the others' is the break
        pool.fail();
      }
    }
  }
  TORCH_CHECK(whole_team, "morphnas: OpenMP gave fewer than the ", parts,
              " threads the kernel's batch parts need; set MORPHNAS_NATIVE=off");
  if (error) std::rethrow_exception(error);
}

// For the tests of ``in_parts`` and ``PartPool``: ``parts`` parts pool ``rounds`` rounds of
// ``width`` column sums (part ``p`` adds ``p + r + j`` to column ``j`` in round ``r``); part
// ``failing`` (−1: none) throws in round ``fail_at`` instead, while the others wait at that
// round's barrier. Returns every part's totals, round by round (``parts × rounds × width``).
inline std::vector<double> pooled_rounds(int64_t parts, int64_t rounds, int64_t width,
                                         int64_t failing, int64_t fail_at) {
  PartPool pool(parts, width);
  std::vector<double> totals(parts * rounds * width);
  in_parts(parts, pool, [&](int64_t p) {
    for (int64_t r = 0; r < rounds; ++r) {
      if (p == failing && r == fail_at)
        throw std::runtime_error("part " + std::to_string(p) + " failed");
      double* slot = pool.slot(p);
      for (int64_t j = 0; j < width; ++j) slot[j] = static_cast<double>(p + r + j);
      pool.total(p, totals.data() + (p * rounds + r) * width);
    }
  });
  return totals;
}

// How many parts ``in_parts`` splits a batch into: one per intra-op thread, with at least 16
// rows each; one inside a parallel region already.
inline int64_t batch_parts(int64_t batch) {
  constexpr int64_t min_rows = 16;
  if (at::in_parallel_region() || omp_in_parallel()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch / min_rows));
}

// Step ``t`` of a buffer whose first dimension is the step, as a pointer (no view made).
template <typename T>
inline T* step_of(const Tensor& buffer, int64_t t) {
  return buffer.data_ptr<T>() + t * buffer.stride(0);
}

// A batch's ``batch`` rows split into ``parts`` parts as evenly as can be (the first ones a row
// longer), one per thread of ``in_parts``: where each part's rows are.
struct RowParts {
  int64_t batch = 0, parts = 1;

  int64_t first_row(int64_t part) const {
    return part * (batch / parts) + std::min(part, batch % parts);
  }
  int64_t rows(int64_t part) const { return first_row(part + 1) - first_row(part); }
  // A part's rows at step ``t`` of a ``(T, B, width)`` buffer.
  template <typename U>
  U* rows_of(const Tensor& buffer, int64_t t, int64_t part) const {
    return step_of<U>(buffer, t) + first_row(part) * buffer.size(-1);
  }
  // A part's rows of a ``(B, width)`` tensor, the dropout mask say (undefined: undefined); the
  // tensor itself for a single part (a view costs a microsecond, and the loops make thousands).
  Tensor rows_of(const Tensor& rows_by_batch, int64_t part) const {
    if (!rows_by_batch.defined() || parts == 1) return rows_by_batch;
    return rows_by_batch.narrow(0, first_row(part), rows(part));
  }
};

// The DARTS kernels' init node: ``[c₀ | g₀] = x̂_t + (m ⊙ h) W_h`` into ``out``, with ``m`` the
// dropout mask on ``h`` (undefined: none) and ``scratch`` room for ``m ⊙ h``.
inline void init_projection(Tensor out, const Tensor& x_proj_t, const Tensor& h,
                            const Tensor& w_h, const Tensor& mask, Tensor& scratch) {
  at::addmm_out(out, x_proj_t, mask.defined() ? at::mul_out(scratch, h, mask) : h, w_h);
}

// ``out += (a b) ⊙ m``: what a matmul of masked states ``m ⊙ s`` sends back to ``s``. The mask
// ``(B, d)`` (undefined: none) applies to each block of ``B`` rows of ``out`` (contiguous).
// ``scratch``, at least as many rows as ``a``, takes the product (undefined: a new tensor).
template <typename T>
void add_masked_product(const Tensor& out, const Tensor& a, const Tensor& b, const Tensor& mask,
                        const Tensor& scratch = Tensor()) {
  if (!mask.defined()) {
    out.addmm_(a, b);
    return;
  }
  Tensor product = scratch.defined() ? scratch.narrow(0, 0, a.size(0))
                                     : at::empty({a.size(0), b.size(1)}, a.options());
  at::mm_out(product, a, b);
  const int64_t B = mask.size(0), d = mask.size(1);
  const T* m = mask.data_ptr<T>();
  const T* p = product.data_ptr<T>();
  T* o = out.data_ptr<T>();
  over_rows(product.size(0), d, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* mr = m + (r % B) * d;
      for (int64_t u = 0; u < d; ++u) o[r * d + u] += p[r * d + u] * mr[u];
    }
  });
}

// BatchNorm without affine over the rows of a ``(rows, d)`` block, as ``nn.BatchNorm1d`` computes
// it (``aten::native_batch_norm`` and its backward), written out. Why not ATen's: at search sizes
// its call, with its dispatch and the temporaries it makes (zeros, ones, empty), took longer
// than the arithmetic; the supernets call it twice per state and step. Sums are taken in double.
template <typename T>
struct RowNorm {
  bool training = false;
  T* running_mean = nullptr;  // training: moved by ``momentum`` (nullptr: frozen); eval: read
  T* running_var = nullptr;
  const T* scale = nullptr;  // eval: 1/sqrt(running_var + eps)
  double momentum = 0.0, eps = 0.0;
  int64_t rows = 0, d = 0;

  // ``out = BN(pre)``. Training: the batch's mean and 1/sqrt(var + eps) per column into ``mean``
  // and ``invstd`` (the backward reads them), and the running statistics moved, the variance
  // unbiased. ``out`` may be ``pre``.
  void forward(const T* pre, T* out, T* mean, T* invstd) const {
    if (!training) {
      normalise_by_running(pre, out, rows);
      return;
    }
    over_columns([&](int64_t u0, int64_t u1) {
      std::vector<double> sum(u1 - u0, 0.0), squares(u1 - u0, 0.0);
      for (int64_t b = 0; b < rows; ++b)
        for (int64_t u = u0; u < u1; ++u) sum[u - u0] += pre[b * d + u];
      for (int64_t u = u0; u < u1; ++u) mean[u] = static_cast<T>(sum[u - u0] / rows);
      for (int64_t b = 0; b < rows; ++b)
        for (int64_t u = u0; u < u1; ++u) {
          const double diff = pre[b * d + u] - mean[u];
          squares[u - u0] += diff * diff;
        }
      for (int64_t u = u0; u < u1; ++u) {
        const double var_sum = squares[u - u0];
        invstd[u] = invstd_of(var_sum);
        move_running(u, mean[u], var_sum);
      }
      for (int64_t b = 0; b < rows; ++b)
        for (int64_t u = u0; u < u1; ++u) out[b * d + u] = (pre[b * d + u] - mean[u]) * invstd[u];
    });
  }

  // ``d_pre`` from ``grad``, the gradient of ``out``; training: through the batch statistics,
  // ``(grad − mean(grad) − x̂ mean(grad x̂)) · invstd`` with ``x̂ = (pre − mean) · invstd``.
  // ``d_pre`` may be ``grad``.
  void backward(const T* grad, const T* pre, const T* mean, const T* invstd, T* d_pre) const {
    if (!training) {
      scale_by_running(grad, d_pre, rows);
      return;
    }
    over_columns([&](int64_t u0, int64_t u1) {
      std::vector<double> sum(u1 - u0, 0.0), dot(u1 - u0, 0.0);
      for (int64_t b = 0; b < rows; ++b)
        for (int64_t u = u0; u < u1; ++u) {
          const T g = grad[b * d + u];
          sum[u - u0] += g;
          dot[u - u0] += g * (pre[b * d + u] - mean[u]);
        }
      std::vector<T> shift(u1 - u0), slope(u1 - u0);  // d_pre = (grad − shift − x̂ slope) invstd
      for (int64_t u = u0; u < u1; ++u) {
        shift[u - u0] = static_cast<T>(sum[u - u0] / rows);
        slope[u - u0] = static_cast<T>(dot[u - u0] / rows * invstd[u]);
      }
      for (int64_t b = 0; b < rows; ++b)
        for (int64_t u = u0; u < u1; ++u) {
          const T x_hat = (pre[b * d + u] - mean[u]) * invstd[u];
          d_pre[b * d + u] = (grad[b * d + u] - shift[u - u0] - x_hat * slope[u - u0]) * invstd[u];
        }
    });
  }

  // ``forward`` for one part of the rows (``here`` of them), in ``in_parts``: the column sums
  // pooled with the other parts' (``pool``, ``2d`` wide), which see the same statistics; part
  // 0 alone writes them and moves the running ones.
  void forward_part(const T* pre, T* out, int64_t here, T* mean, T* invstd, PartPool& pool,
                    int64_t part) const {
    if (!training) {
      normalise_by_running(pre, out, here);
      return;
    }
    std::vector<double> total(2 * d);
    double* sum = pool.slot(part);
    std::fill(sum, sum + 2 * d, 0.0);
    for (int64_t b = 0; b < here; ++b)
      for (int64_t u = 0; u < d; ++u) sum[u] += pre[b * d + u];
    pool.total(part, total.data());
    std::vector<T> mu(d), inv(d);
    for (int64_t u = 0; u < d; ++u) mu[u] = static_cast<T>(total[u] / rows);
    double* squares = pool.slot(part);
    std::fill(squares, squares + 2 * d, 0.0);
    for (int64_t b = 0; b < here; ++b)
      for (int64_t u = 0; u < d; ++u) {
        const double diff = pre[b * d + u] - mu[u];
        squares[u] += diff * diff;
      }
    pool.total(part, total.data());
    for (int64_t u = 0; u < d; ++u) {
      const double var_sum = total[u];
      inv[u] = invstd_of(var_sum);
      if (part != 0) continue;
      mean[u] = mu[u];
      invstd[u] = inv[u];
      move_running(u, mu[u], var_sum);
    }
    for (int64_t b = 0; b < here; ++b)
      for (int64_t u = 0; u < d; ++u) out[b * d + u] = (pre[b * d + u] - mu[u]) * inv[u];
  }

  // ``backward`` for one part of the rows, as ``forward_part``.
  void backward_part(const T* grad, const T* pre, int64_t here, const T* mean, const T* invstd,
                     T* d_pre, PartPool& pool, int64_t part) const {
    if (!training) {
      scale_by_running(grad, d_pre, here);
      return;
    }
    std::vector<double> total(2 * d);
    double* sums = pool.slot(part);  // Σ grad, then Σ grad (pre − mean)
    std::fill(sums, sums + 2 * d, 0.0);
    for (int64_t b = 0; b < here; ++b)
      for (int64_t u = 0; u < d; ++u) {
        const T g = grad[b * d + u];
        sums[u] += g;
        sums[d + u] += g * (pre[b * d + u] - mean[u]);
      }
    pool.total(part, total.data());
    std::vector<T> shift(d), slope(d);
    for (int64_t u = 0; u < d; ++u) {
      shift[u] = static_cast<T>(total[u] / rows);
      slope[u] = static_cast<T>(total[d + u] / rows * invstd[u]);
    }
    for (int64_t b = 0; b < here; ++b)
      for (int64_t u = 0; u < d; ++u) {
        const T x_hat = (pre[b * d + u] - mean[u]) * invstd[u];
        d_pre[b * d + u] = (grad[b * d + u] - shift[u] - x_hat * slope[u]) * invstd[u];
      }
  }

 private:
  // 1/sqrt(var + eps) from a column's sum of squared deviations over the batch.
  T invstd_of(double var_sum) const { return static_cast<T>(1.0 / std::sqrt(var_sum / rows + eps)); }

  // The running statistics of column ``u`` moved by ``momentum`` towards the batch's, the
  // variance unbiased, as ATen moves them (none when frozen).
  void move_running(int64_t u, T mean, double var_sum) const {
    if (running_mean == nullptr) return;
    running_mean[u] = static_cast<T>((1 - momentum) * running_mean[u] + momentum * mean);
    running_var[u] = static_cast<T>((1 - momentum) * running_var[u] +
                                    momentum * var_sum / static_cast<double>(rows - 1));
  }

  // Evaluation: ``out = (pre − running mean) · scale`` over ``here`` rows, and its gradient.
  void normalise_by_running(const T* pre, T* out, int64_t here) const {
    for (int64_t b = 0; b < here; ++b)
      for (int64_t u = 0; u < d; ++u) out[b * d + u] = (pre[b * d + u] - running_mean[u]) * scale[u];
  }
  void scale_by_running(const T* grad, T* d_pre, int64_t here) const {
    for (int64_t b = 0; b < here; ++b)
      for (int64_t u = 0; u < d; ++u) d_pre[b * d + u] = grad[b * d + u] * scale[u];
  }

  // ``body(first, end)`` over columns, split across threads in chunks of at least 2,048 elements.
  template <typename F>
  void over_columns(const F& body) const {
    at::parallel_for(0, d, std::max<int64_t>(1, 2048 / std::max<int64_t>(rows, 1)), body);
  }
};

// A ``RowNorm`` on a BatchNorm's tensors: its running statistics (absent: frozen, in training),
// and in evaluation ``scale`` = 1/sqrt(running_var + eps).
template <typename T>
RowNorm<T> row_norm(bool training, const OptTensor& running_mean, const OptTensor& running_var,
                    const Tensor& scale, double momentum, double eps, int64_t rows, int64_t d) {
  RowNorm<T> norm;
  norm.training = training;
  if (running_mean.has_value() && running_mean->defined()) {
    norm.running_mean = running_mean->data_ptr<T>();
    norm.running_var = running_var->data_ptr<T>();
  }
  if (!training) norm.scale = scale.data_ptr<T>();
  norm.momentum = momentum;
  norm.eps = eps;
  norm.rows = rows;
  norm.d = d;
  return norm;
}

// One row of a highway blend, the recurrent cells' common step: ``[c | v]`` turned into
// ``[σ(c) | f(v)]`` in place, and ``out = base + σ(c)(f(v) − base)``.
template <typename T, typename F>
inline void highway_row(T* gate, T* value, const T* base, T* out, int64_t d, const F& f) {
  for (int64_t u = 0; u < d; ++u) {
    gate[u] = sigmoid(gate[u]);
    value[u] = f(value[u]);
    out[u] = base[u] + gate[u] * (value[u] - base[u]);
  }
}

// ``out`` (``size`` elements) = a cell's output rule over its nodes 1..count: their mean, or
// node ``count`` itself; ``node(k)`` points at node ``k``. The mean of no nodes (a first node
// that is residual under ``mean``) is 0/0, as eagerly.
template <typename T, typename Node>
void output_rule(bool mean, int64_t count, int64_t size, const Node& node, T* out) {
  if (!mean) {
    std::memcpy(out, node(count), size * sizeof(T));
    return;
  }
  const T inv = T(1) / T(count);
  for (int64_t j = 0; j < size; ++j) out[j] = T(0);
  for (int64_t k = 1; k <= count; ++k) {
    const T* s = node(k);
    for (int64_t j = 0; j < size; ++j) out[j] += s[j];
  }
  for (int64_t j = 0; j < size; ++j) out[j] *= inv;
}

// The gradient of ``output_rule``: ``grad`` (``size`` elements) added into the rows of the nodes
// it read, ``row(k)`` pointing at node ``k``'s.
template <typename T, typename Row>
void output_rule_backward(bool mean, int64_t count, int64_t size, const T* grad, const Row& row) {
  if (!mean) {
    T* r = row(count);
    for (int64_t j = 0; j < size; ++j) r[j] += grad[j];
    return;
  }
  const T inv = T(1) / T(count);
  for (int64_t k = 1; k <= count; ++k) {
    T* r = row(k);
    for (int64_t j = 0; j < size; ++j) r[j] += grad[j] * inv;
  }
}

inline Tensor nothing(const Tensor& like) { return at::empty({0}, like.options()); }

inline std::vector<Tensor> contiguous(const std::vector<Tensor>& ts) {
  std::vector<Tensor> out;
  for (const Tensor& t : ts) out.push_back(t.contiguous());
  return out;
}

inline std::vector<OptTensor> contiguous(const std::vector<OptTensor>& ts) {
  std::vector<OptTensor> out;
  for (const OptTensor& t : ts) out.push_back(t ? OptTensor(t->contiguous()) : std::nullopt);
  return out;
}

}  // namespace morphnas_native
