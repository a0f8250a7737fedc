// What every native kernel shares: the activations in branch-free arithmetic that vectorises,
// and the loop over batch rows split across threads. Included once, by kernels.cpp (one
// translation unit, so that torch's headers, most of the build's 20-odd seconds, are parsed once).

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
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
// e = exp(−g), σ = 1/(1+e) and tanh = (1−e²)/(1+e²) = 2/(1+e²) − 1, and the two reciprocals
// from one division, r = 1/((1+e)(1+e²)). Half the exps and divisions of computing each alone,
// which bound the supernet's elementwise loops. ``g`` is clamped to ±25 first so that the
// product stays finite in float32; beyond it tanh is ±1 in float32 and σ within 1.4e−11 of 0 or 1.
inline void tanh_and_sigmoid(float g, float& tanh_out, float& sigmoid_out) {
  const float e = exp_approx(-std::min(std::max(g, -25.0f), 25.0f));
  const float q = 1.0f + e, q2 = 1.0f + e * e;
  const float r = 1.0f / (q * q2);
  sigmoid_out = r * q2;
  tanh_out = 2.0f * (r * q) - 1.0f;
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

// The DARTS kernels' init node: ``[c₀ | g₀] = x̂_t + (m ⊙ h) W_h`` into ``out``, with ``m`` the
// dropout mask on ``h`` (undefined: none) and ``scratch`` room for ``m ⊙ h``.
inline void init_projection(Tensor out, const Tensor& x_proj_t, const Tensor& h,
                            const Tensor& w_h, const Tensor& mask, Tensor& scratch) {
  at::addmm_out(out, x_proj_t, mask.defined() ? at::mul_out(scratch, h, mask) : h, w_h);
}

// ``out += (a b) ⊙ m``: what a matmul of masked states ``m ⊙ s`` sends back to ``s``. The mask
// ``(B, d)`` (undefined: none) applies to each block of ``B`` rows of ``out``.
inline void add_masked_product(const Tensor& out, const Tensor& a, const Tensor& b,
                               const Tensor& mask) {
  if (!mask.defined()) {
    out.addmm_(a, b);
    return;
  }
  const int64_t B = mask.size(0), d = mask.size(1);
  out.view({-1, B, d}).addcmul_(at::mm(a, b).view({-1, B, d}), mask);
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
      for (int64_t b = 0; b < rows; ++b)
        for (int64_t u = 0; u < d; ++u)
          out[b * d + u] = (pre[b * d + u] - running_mean[u]) * scale[u];
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
        invstd[u] = static_cast<T>(1.0 / std::sqrt(var_sum / rows + eps));
        if (running_mean == nullptr) continue;
        running_mean[u] = static_cast<T>((1 - momentum) * running_mean[u] + momentum * mean[u]);
        running_var[u] = static_cast<T>((1 - momentum) * running_var[u] +
                                        momentum * var_sum / static_cast<double>(rows - 1));
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
      for (int64_t b = 0; b < rows; ++b)
        for (int64_t u = 0; u < d; ++u) d_pre[b * d + u] = grad[b * d + u] * scale[u];
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

 private:
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

// Step ``t`` of a buffer whose first dimension is the step, as a pointer (no view made).
template <typename T>
inline T* step_of(const Tensor& buffer, int64_t t) {
  return buffer.data_ptr<T>() + t * buffer.stride(0);
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
