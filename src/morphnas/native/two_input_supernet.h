// The time loops of the two-input search cell, forward and backward, in C++: the native twin of
// the loops in morphnas/spaces/fused_two_input.py (read its docstring first).
//
// Why: at search sizes the Python loops spend about a third of a step calling ATen (a few dozen
// calls per node and step). As for the derived two-input cell (two_input_cell.h), only the loops
// are here; the per-sequence work (buffers, the matmuls on ``u`` hoisted before the loop, every
// weight gradient after it, BatchNorm's batch counter) is shared by both kernels in Python, and
// these functions fill the buffers the Python loops fill. Matmuls stay ATen calls, BatchNorm is
// common.h's ``RowNorm``; a node's terms and their mixture at a step are one pass over its rows,
// forward, and their gradients another, backward, with the op weights' reductions taken in that
// pass.

#pragma once

#include "common.h"

namespace morphnas_native::two_input_supernet {

enum Kind : int64_t { kAddAct = 0, kHighway = 1, kHadamard = 2, kAdd = 3 };

// One node, as ``fused_two_input._Node`` holds it. States: ``-1`` is ``u``, ``0`` is ``m ⊙ h``,
// ``j`` node ``j``.
struct Node {
  int64_t a = 0, b = 0;
  std::vector<int64_t> kinds, acts, columns;  // per term: its kind, an add_*'s activation and
  std::vector<bool> first;                    // column in ``pre``, and whether it writes first
  int64_t highway_column = -1, a_cols = 0;    // the highway's ``[c | g]`` columns; columns on a
  bool hoisted = false, residual = false;     // ``b M_b`` taken before the loop; grown
  OptTensor pre, w_a, w_b;  // (T, B, width): a M_a + b M_b; its weight's two halves
  Tensor terms, normed, state, op_w;  // (T, K, B, d); (T, B, d) BN output; (T, B, d); (K,)
  OptTensor gamma;
  int64_t n_terms() const { return static_cast<int64_t>(kinds.size()); }
};

struct Sequence {
  Tensor u, h_in, hs;  // (T, B, d): u; m ⊙ h_{t−1} (``hs`` itself without a mask); (T+1, B, d)
  OptTensor mask;
  std::vector<Node> nodes;
  bool output_mean = true, squash_tanh = false;
  // BatchNorm (no affine), as ``fused_ops.SequenceNorm``: off unless ``bn``.
  bool bn = false, bn_training = false;
  OptTensor running_mean, running_var;
  Tensor bn_pre, bn_mean, bn_invstd, bn_scale;  // (T, N, B, d), (T, N, d) ×2; eval: (d,)
  double momentum = 0.0, eps = 0.0;
};

template <typename T>
class Loops {
 public:
  explicit Loops(const Sequence& s)
      : s_(s), B_(s.u.size(1)), d_(s.u.size(2)),
        bn_(s.bn ? row_norm<T>(s.bn_training, s.running_mean, s.running_var, s.bn_scale,
                               s.momentum, s.eps, B_, d_)
                 : RowNorm<T>()) {}

  // State ``j`` at step ``t`` (rows of ``d``, contiguous), and as a view for ATen.
  T* state(int64_t t, int64_t j) const {
    if (j == -1) return step_of<T>(s_.u, t);
    if (j == 0) return step_of<T>(s_.h_in, t);
    return step_of<T>(s_.nodes[j - 1].state, t);
  }
  Tensor state_view(int64_t t, int64_t j) const {
    if (j == -1) return s_.u.select(0, t);
    if (j == 0) return s_.h_in.select(0, t);
    return s_.nodes[j - 1].state.select(0, t);
  }

  // ``out`` = the output rule over nodes 1..count at step ``t``.
  void base_of(int64_t t, int64_t count, T* out) const {
    const auto node = [&](int64_t k) { return state(t, k); };
    output_rule(s_.output_mean, count, B_ * d_, node, out);
  }

  void forward() {
    const int64_t steps = s_.u.size(0), N = n(), size = B_ * d_;
    for (int64_t t = 0; t < steps; ++t) {
      if (s_.mask.has_value()) {
        const T* h = step_of<T>(s_.hs, t);
        const T* m = s_.mask->data_ptr<T>();
        T* out = state(t, 0);
        for (int64_t j = 0; j < size; ++j) out[j] = h[j] * m[j];
      }
      for (int64_t i = 0; i < N; ++i) node_forward(t, i);
      T* h = step_of<T>(s_.hs, t + 1);
      base_of(t, N, h);
      if (s_.squash_tanh)
        for (int64_t j = 0; j < size; ++j) h[j] = tanh_value(h[j]);
    }
  }

  // Fills ``d_u`` (all but the hoisted matmuls' share) and ``d_pre``, adds into ``d_op_w`` and
  // ``d_gamma`` (per node; an empty tensor for a node without), and returns d h0.
  Tensor backward(const Tensor& grad_out, const Tensor& d_u, const std::vector<OptTensor>& d_pre,
                  const std::vector<Tensor>& d_op_w, const std::vector<Tensor>& d_gamma) {
    const int64_t steps = s_.u.size(0), N = n(), size = B_ * d_;
    const auto opt = grad_out.options();
    d_states_ = at::empty({N + 1, B_, d_}, opt);
    d_mixed_ = at::empty({B_, d_}, opt);
    Tensor scaled = at::empty({B_, d_}, opt), carry = at::zeros({B_, d_}, opt);
    reduced_.assign(N, {});
    d_gamma_.assign(N, {});
    for (int64_t i = 0; i < N; ++i) {
      reduced_[i].assign(s_.nodes[i].n_terms(), 0.0);
      d_gamma_[i].assign(s_.nodes[i].residual ? d_ : 0, 0.0);
    }
    for (int64_t t = steps - 1; t >= 0; --t) {
      T* rows = d_states_.data_ptr<T>();
      const T* g = step_of<T>(grad_out, t);
      const T* cp = carry.data_ptr<T>();
      const T* h = step_of<T>(s_.hs, t + 1);
      std::fill(rows, rows + (N + 1) * size, T(0));
      const T share = s_.output_mean ? T(1) / T(N) : T(1);
      for (int64_t j = 0; j < size; ++j) {
        T dh = g[j] + cp[j];
        if (s_.squash_tanh) dh *= T(1) - h[j] * h[j];
        if (!s_.output_mean) rows[N * size + j] = dh;
        else
          for (int64_t i = 1; i <= N; ++i) rows[i * size + j] = dh * share;
      }
      for (int64_t i = N - 1; i >= 0; --i) node_backward(t, i, d_u, d_pre[i], scaled);
      T* c = carry.data_ptr<T>();
      const T* m = s_.mask.has_value() ? s_.mask->data_ptr<T>() : nullptr;
      for (int64_t j = 0; j < size; ++j) c[j] = m != nullptr ? rows[j] * m[j] : rows[j];
    }
    for (int64_t i = 0; i < N; ++i) {
      T* w = d_op_w[i].data_ptr<T>();
      for (int64_t k = 0; k < s_.nodes[i].n_terms(); ++k) w[k] += static_cast<T>(reduced_[i][k]);
      if (s_.nodes[i].residual) {
        T* dg = d_gamma[i].data_ptr<T>();
        for (int64_t u = 0; u < d_; ++u) dg[u] += static_cast<T>(d_gamma_[i][u]);
      }
    }
    return carry;
  }

 private:
  const Sequence& s_;
  const int64_t B_, d_;
  const RowNorm<T> bn_;
  Tensor d_states_, d_mixed_;  // d_mixed_: a node's gradient before its BatchNorm
  std::vector<std::vector<double>> reduced_, d_gamma_;  // Σ ⟨term_k, d mixed⟩; Σ d s ⊙ y
  ChunkSums chunks_;

  int64_t n() const { return static_cast<int64_t>(s_.nodes.size()); }

  void node_forward(int64_t t, int64_t i) {
    const Node& node = s_.nodes[i];
    const int64_t d = d_, K = node.n_terms();
    const Tensor a_view = state_view(t, node.a), b_view = state_view(t, node.b);
    if (node.pre.has_value()) {
      Tensor pre_t = node.pre->select(0, t);
      if (!node.hoisted) at::mm_out(pre_t, b_view, *node.w_b);
      if (node.a_cols > 0) pre_t.narrow(1, 0, node.a_cols).addmm_(a_view, *node.w_a);
    }
    const T* a = state(t, node.a);
    const T* b = state(t, node.b);
    T* pre = node.pre.has_value() ? step_of<T>(*node.pre, t) : nullptr;
    const int64_t width = node.pre.has_value() ? node.pre->size(2) : 0;
    T* terms = step_of<T>(node.terms, t);
    T* mixed = s_.bn ? bn_slot(s_.bn_pre, t, i) : step_of<T>(node.normed, t);
    const T* w = node.op_w.data_ptr<T>();
    over_rows(B_, d * K, [&](int64_t b0, int64_t b1) {
      for (int64_t r = b0; r < b1; ++r) {
        const T* ar = a + r * d;
        const T* br = b + r * d;
        T* pr = pre + r * width;
        T* mr = mixed + r * d;
        for (int64_t u = 0; u < d; ++u) mr[u] = T(0);
        for (int64_t k = 0; k < K; ++k) {
          T* term = terms + (k * B_ + r) * d;
          const T wk = w[k];
          switch (node.kinds[k]) {
            case kHadamard:
              for (int64_t u = 0; u < d; ++u) mr[u] += wk * (term[u] = ar[u] * br[u]);
              break;
            case kAdd:
              for (int64_t u = 0; u < d; ++u) mr[u] += wk * (term[u] = ar[u] + br[u]);
              break;
            case kHighway: {  // [c | g] → [σ(c) | tanh(g)] in place; a + σ(c)(tanh(g) − a)
              T* gate = pr + node.highway_column;
              highway_row(gate, gate + d, ar, term, d, [](T v) { return tanh_value(v); });
              for (int64_t u = 0; u < d; ++u) mr[u] += wk * term[u];
              break;
            }
            default: {
              const T* z = pr + node.columns[k];
              with_activation(node.acts[k], [&](auto act) {
                for (int64_t u = 0; u < d; ++u)
                  mr[u] += wk * (term[u] = activate<decltype(act)::value>(z[u]));
              });
            }
          }
        }
      }
    });
    T* normed = step_of<T>(node.normed, t);
    if (s_.bn) norm_forward(t, i, normed);
    if (node.residual) {  // s = base(s_1..s_{i−1}) + γ ⊙ y
      T* s = step_of<T>(node.state, t);
      base_of(t, i, s);
      const T* gm = node.gamma->data_ptr<T>();
      for (int64_t r = 0; r < B_; ++r)
        for (int64_t u = 0; u < d; ++u) s[r * d + u] += gm[u] * normed[r * d + u];
    }
  }

  T* bn_slot(const Tensor& buffer, int64_t t, int64_t i) const {
    return buffer.data_ptr<T>() + (t * n() + i) * B_ * d_;
  }

  // BatchNorm of node ``i`` at step ``t``, from its mixture in ``bn_pre`` into ``out``.
  void norm_forward(int64_t t, int64_t i, T* out) {
    bn_.forward(bn_slot(s_.bn_pre, t, i), out, stat_slot(s_.bn_mean, t, i),
                stat_slot(s_.bn_invstd, t, i));
  }

  // Node ``i``'s gradient before its BatchNorm at step ``t``, from ``grad``, the one after it.
  const T* norm_backward(int64_t t, int64_t i, const T* grad) {
    if (!s_.bn) return grad;
    T* d_mixed = d_mixed_.data_ptr<T>();
    bn_.backward(grad, bn_slot(s_.bn_pre, t, i), stat_slot(s_.bn_mean, t, i),
                 stat_slot(s_.bn_invstd, t, i), d_mixed);
    return d_mixed;
  }

  // Node ``i``'s BatchNorm statistics at step ``t`` in a ``(T, N, d)`` buffer; none in evaluation.
  T* stat_slot(const Tensor& buffer, int64_t t, int64_t i) const {
    return s_.bn_training ? buffer.data_ptr<T>() + (t * n() + i) * d_ : nullptr;
  }

  // The gradient row of state ``j`` at this step: ``u``'s is ``d_u`` at step ``t``.
  T* d_row(int64_t t, int64_t j, const Tensor& d_u) const {
    if (j == -1) return step_of<T>(d_u, t);
    return d_states_.data_ptr<T>() + j * B_ * d_;
  }
  Tensor d_row_view(int64_t t, int64_t j, const Tensor& d_u) const {
    if (j == -1) return d_u.select(0, t);
    return d_states_.select(0, j);
  }

  void node_backward(int64_t t, int64_t i, const Tensor& d_u, const OptTensor& d_pre,
                     Tensor& scaled) {
    const Node& node = s_.nodes[i];
    const int64_t d = d_, K = node.n_terms(), size = B_ * d;
    T* rows = d_states_.data_ptr<T>();
    Tensor d_s = d_states_.select(0, i + 1);
    if (node.residual) {
      const T* ds = d_s.data_ptr<T>();
      const T* y = step_of<T>(node.normed, t);
      const T* gm = node.gamma->data_ptr<T>();
      T* out = scaled.data_ptr<T>();
      std::vector<double>& dg = d_gamma_[i];
      for (int64_t r = 0; r < B_; ++r)
        for (int64_t u = 0; u < d; ++u) {
          dg[u] += static_cast<double>(ds[r * d + u] * y[r * d + u]);
          out[r * d + u] = ds[r * d + u] * gm[u];
        }
      const auto row_of = [&](int64_t k) { return rows + k * size; };
      output_rule_backward(s_.output_mean, i, size, ds, row_of);
      d_s = scaled;
    }
    const T* dm = norm_backward(t, i, d_s.data_ptr<T>());
    const T* a = state(t, node.a);
    const T* b = state(t, node.b);
    T* da = d_row(t, node.a, d_u);
    T* db = d_row(t, node.b, d_u);
    const T* pre = node.pre.has_value() ? step_of<T>(*node.pre, t) : nullptr;
    T* dpre = d_pre.has_value() ? step_of<T>(*d_pre, t) : nullptr;
    const int64_t width = node.pre.has_value() ? node.pre->size(2) : 0;
    const T* terms = step_of<T>(node.terms, t);
    const T* w = node.op_w.data_ptr<T>();
    over_rows(B_, d * K, [&](int64_t b0, int64_t b1) {
      std::vector<double> part(K, 0.0);
      for (int64_t r = b0; r < b1; ++r) {
        const T* ar = a + r * d;
        const T* br = b + r * d;
        const T* dmr = dm + r * d;
        T* dar = da + r * d;
        T* dbr = db + r * d;
        for (int64_t k = 0; k < K; ++k) {
          const T* term = terms + (k * B_ + r) * d;
          const T wk = w[k];
          T dot = T(0);
          for (int64_t u = 0; u < d; ++u) dot += term[u] * dmr[u];
          part[k] += dot;
          switch (node.kinds[k]) {
            case kHadamard:
              for (int64_t u = 0; u < d; ++u) {
                const T dt = wk * dmr[u];
                dar[u] += dt * br[u];
                dbr[u] += dt * ar[u];
              }
              break;
            case kAdd:
              for (int64_t u = 0; u < d; ++u) {
                dar[u] += wk * dmr[u];
                dbr[u] += wk * dmr[u];
              }
              break;
            case kHighway: {
              const T* gate = pre + r * width + node.highway_column;
              const T* cand = gate + d;
              T* dgate = dpre + r * width + node.highway_column;
              T* dcand = dgate + d;
              for (int64_t u = 0; u < d; ++u) {
                const T dt = wk * dmr[u], c = gate[u], v = cand[u];
                dcand[u] = dt * c * (T(1) - v * v);
                dgate[u] = dt * (v - ar[u]) * c * (T(1) - c);
                dar[u] += dt * (T(1) - c);
              }
              break;
            }
            default: {  // slope from the value (tanh, sigmoid) or the pre-activation (relu)
              const T* z = pre + r * width + node.columns[k];
              T* dz = dpre + r * width + node.columns[k];
              const bool first = node.first[k];
              with_activation(node.acts[k], [&](auto act) {
                constexpr int64_t kAct = decltype(act)::value;
                const T* v = kAct == kRelu ? z : term;
                for (int64_t u = 0; u < d; ++u) {
                  const T g = wk * dmr[u] * slope<kAct>(v[u]);
                  dz[u] = first ? g : dz[u] + g;
                }
              });
            }
          }
        }
      }
      chunks_.add(b0, std::move(part));
    });
    chunks_.merge_into(reduced_[i]);
    if (d_pre.has_value()) {
      Tensor d_pre_t = d_pre->select(0, t);
      if (node.a_cols > 0)
        d_row_view(t, node.a, d_u).addmm_(d_pre_t.narrow(1, 0, node.a_cols), node.w_a->t());
      if (!node.hoisted) d_row_view(t, node.b, d_u).addmm_(d_pre_t, node.w_b->t());
    }
  }
};

inline void forward(const Sequence& sequence) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the caller's buffers only
  AT_DISPATCH_FLOATING_TYPES(sequence.u.scalar_type(), "two_input_supernet_forward",
                             [&] { Loops<scalar_t>(sequence).forward(); });
}

inline Tensor backward(const Sequence& sequence, const Tensor& grad_out, const Tensor& d_u,
                       const std::vector<OptTensor>& d_pre, const std::vector<Tensor>& d_op_w,
                       const std::vector<Tensor>& d_gamma) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor grad = grad_out.contiguous();
  Tensor d_h0;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "two_input_supernet_backward", [&] {
    d_h0 = Loops<scalar_t>(sequence).backward(grad, d_u, d_pre, d_op_w, d_gamma);
  });
  return d_h0;
}

inline void bind(pybind11::module_ m) {
  pybind11::class_<Node>(m, "Node")
      .def(pybind11::init<>())
      .def_readwrite("a", &Node::a)
      .def_readwrite("b", &Node::b)
      .def_readwrite("kinds", &Node::kinds)
      .def_readwrite("acts", &Node::acts)
      .def_readwrite("columns", &Node::columns)
      .def_readwrite("first", &Node::first)
      .def_readwrite("highway_column", &Node::highway_column)
      .def_readwrite("a_cols", &Node::a_cols)
      .def_readwrite("hoisted", &Node::hoisted)
      .def_readwrite("residual", &Node::residual)
      .def_readwrite("pre", &Node::pre)
      .def_readwrite("w_a", &Node::w_a)
      .def_readwrite("w_b", &Node::w_b)
      .def_readwrite("terms", &Node::terms)
      .def_readwrite("normed", &Node::normed)
      .def_readwrite("state", &Node::state)
      .def_readwrite("op_w", &Node::op_w)
      .def_readwrite("gamma", &Node::gamma);
  pybind11::class_<Sequence>(m, "Sequence")
      .def(pybind11::init<>())
      .def_readwrite("u", &Sequence::u)
      .def_readwrite("h_in", &Sequence::h_in)
      .def_readwrite("hs", &Sequence::hs)
      .def_readwrite("mask", &Sequence::mask)
      .def_readwrite("nodes", &Sequence::nodes)
      .def_readwrite("output_mean", &Sequence::output_mean)
      .def_readwrite("squash_tanh", &Sequence::squash_tanh)
      .def_readwrite("bn", &Sequence::bn)
      .def_readwrite("bn_training", &Sequence::bn_training)
      .def_readwrite("running_mean", &Sequence::running_mean)
      .def_readwrite("running_var", &Sequence::running_var)
      .def_readwrite("bn_pre", &Sequence::bn_pre)
      .def_readwrite("bn_mean", &Sequence::bn_mean)
      .def_readwrite("bn_invstd", &Sequence::bn_invstd)
      .def_readwrite("bn_scale", &Sequence::bn_scale)
      .def_readwrite("momentum", &Sequence::momentum)
      .def_readwrite("eps", &Sequence::eps);
  m.def("forward", &forward);
  m.def("backward", &backward);
}

}  // namespace morphnas_native::two_input_supernet
