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
// pass. With more than one intra-op thread the batch is split into parts, one a thread, for the
// whole sequence (``Loops``), as in the DARTS supernet. Under input choice a node reads the
// mixtures its slot weights make of the earlier states, written into buffers of its own at each
// step; backward, it keeps ``d a`` and ``d b`` of every step for the slot weights' gradients,
// which Python takes once per sequence, and hands each state its share within the step.

#pragma once

#include "common.h"

namespace morphnas_native::two_input_supernet {

// ``kOne``: a sampled node's constant term (``fused_two_input.ONE``), 1 everywhere, written
// once by the caller; it reads no state.
enum Kind : int64_t { kAddAct = 0, kHighway = 1, kHadamard = 2, kAdd = 3, kOne = 4 };

// One node, as ``fused_two_input._Node`` holds it. States: ``-1`` is ``u``, ``0`` is ``m ⊙ h``,
// ``j`` node ``j``. Under input choice (``choice``) ``a`` and ``b`` are unused: the node reads
// ``a_in`` and ``b_in``, its slot weights' mixtures of the states ``-1 … i−1`` (weight ``j + 1``
// for state ``j``), which the forward writes.
struct Node {
  int64_t a = 0, b = 0;
  bool choice = false;
  OptTensor slot_a, slot_b, a_in, b_in;  // (i + 1,) ×2; (T, B, d) ×2
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

// The loops over one sequence, the batch's rows in parts, one thread each, for the whole
// sequence (common.h's ``in_parts``), as in the DARTS supernet: a part runs its own matmuls and
// loops, and the parts meet only where BatchNorm pools its column sums. The buffers are
// ``(T, B, …)``, so a part's rows of a step are one block of every buffer.
template <typename T>
class Loops {
 public:
  explicit Loops(const Sequence& s)
      : s_(s), B_(s.u.size(1)), d_(s.u.size(2)), split_{B_, batch_parts(B_)},
        bn_(s.bn ? row_norm<T>(s.bn_training, s.running_mean, s.running_var, s.bn_scale,
                               s.momentum, s.eps, B_, d_)
                 : RowNorm<T>()),
        pool_(split_.parts, 2 * d_) {}

  void forward() {
    const int64_t steps = s_.u.size(0), N = n();
    in_parts(split_.parts, pool_, [&](int64_t p) {
      const int64_t size = split_.rows(p) * d_;
      const T* m = s_.mask.has_value() ? split_.rows_of(*s_.mask, p).data_ptr<T>() : nullptr;
      for (int64_t t = 0; t < steps; ++t) {
        if (m != nullptr) {
          const T* h = split_.rows_of<T>(s_.hs, t, p);
          T* out = state(t, 0, p);
          for (int64_t j = 0; j < size; ++j) out[j] = h[j] * m[j];
        }
        for (int64_t i = 0; i < N; ++i) node_forward(t, i, p);
        T* h = split_.rows_of<T>(s_.hs, t + 1, p);
        base_of(t, N, p, h);
        if (s_.squash_tanh)
          for (int64_t j = 0; j < size; ++j) h[j] = tanh_value(h[j]);
      }
    });
  }

  // Fills ``d_u`` (all but the hoisted matmuls' share) and ``d_pre``, adds into ``d_op_w`` and
  // ``d_gamma`` (per node; an empty tensor for a node without), and returns d h0.
  // Under input choice, ``d_a_in`` and ``d_b_in`` (per node; zeros, ``None`` for a node without)
  // take ``d a`` and ``d b`` of every step.
  Tensor backward(const Tensor& grad_out, const Tensor& d_u, const std::vector<OptTensor>& d_pre,
                  const std::vector<Tensor>& d_op_w, const std::vector<Tensor>& d_gamma,
                  const std::vector<OptTensor>& d_a_in, const std::vector<OptTensor>& d_b_in) {
    const int64_t steps = s_.u.size(0), N = n();
    const auto opt = grad_out.options();
    Tensor carry = at::zeros({B_, d_}, opt);
    for (int64_t p = 0; p < split_.parts; ++p) parts_.emplace_back(s_, split_.rows(p), opt);
    const T share = s_.output_mean ? T(1) / T(N) : T(1);
    in_parts(split_.parts, pool_, [&](int64_t p) {
      const int64_t size = split_.rows(p) * d_;
      T* c = split_.rows_of(carry, p).data_ptr<T>();
      const T* m = s_.mask.has_value() ? split_.rows_of(*s_.mask, p).data_ptr<T>() : nullptr;
      T* rows = parts_[p].d_states.template data_ptr<T>();
      for (int64_t t = steps - 1; t >= 0; --t) {
        const T* g = split_.rows_of<T>(grad_out, t, p);
        const T* h = split_.rows_of<T>(s_.hs, t + 1, p);
        std::fill(rows, rows + (N + 1) * size, T(0));
        for (int64_t j = 0; j < size; ++j) {
          T dh = g[j] + c[j];
          if (s_.squash_tanh) dh *= T(1) - h[j] * h[j];
          if (!s_.output_mean) rows[N * size + j] = dh;
          else
            for (int64_t i = 1; i <= N; ++i) rows[i * size + j] = dh * share;
        }
        for (int64_t i = N - 1; i >= 0; --i)
          node_backward(t, i, p, d_u, d_pre[i], d_a_in[i], d_b_in[i]);
        for (int64_t j = 0; j < size; ++j) c[j] = m != nullptr ? rows[j] * m[j] : rows[j];
      }
    });
    for (int64_t i = 0; i < N; ++i) {  // the parts' sums, in part order
      T* w = d_op_w[i].data_ptr<T>();
      for (int64_t k = 0; k < s_.nodes[i].n_terms(); ++k) {
        double total = 0.0;
        for (const Part& part : parts_) total += part.reduced[i][k];
        w[k] += static_cast<T>(total);
      }
      if (!s_.nodes[i].residual) continue;
      T* dg = d_gamma[i].data_ptr<T>();
      for (int64_t u = 0; u < d_; ++u) {
        double total = 0.0;
        for (const Part& part : parts_) total += part.d_gamma[i][u];
        dg[u] += static_cast<T>(total);
      }
    }
    return carry;
  }

 private:
  // What one part's thread keeps in the backward: its rows' gradients of a step's states, room
  // for a node's gradient before its BatchNorm and for a residual's scaled one, and its shares of
  // the sums over the batch.
  struct Part {
    Tensor d_states, d_mixed, scaled;                     // (N + 1, R, d); (R, d) ×2
    std::vector<std::vector<double>> reduced, d_gamma;  // per node: Σ ⟨term_k, d mixed⟩; Σ ds ⊙ y
    ChunkSums chunks;

    Part(const Sequence& s, int64_t R, const at::TensorOptions& opt) {
      const int64_t d = s.u.size(2), N = static_cast<int64_t>(s.nodes.size());
      d_states = at::empty({N + 1, R, d}, opt);
      d_mixed = at::empty({R, d}, opt);
      scaled = at::empty({R, d}, opt);
      for (const Node& node : s.nodes) {
        reduced.emplace_back(node.n_terms(), 0.0);
        d_gamma.emplace_back(node.residual ? d : 0, 0.0);
      }
    }
  };

  const Sequence& s_;
  const int64_t B_, d_;
  const RowParts split_;
  const RowNorm<T> bn_;
  PartPool pool_;           // the BatchNorm's column sums, across parts
  std::deque<Part> parts_;  // a deque: a Part (its ChunkSums' mutex) cannot move

  int64_t n() const { return static_cast<int64_t>(s_.nodes.size()); }

  // State ``j`` at step ``t`` (``-1`` is ``u``, ``0`` is ``m ⊙ h``, ``j`` node ``j``), whole.
  const Tensor& states_of(int64_t j) const {
    if (j == -1) return s_.u;
    if (j == 0) return s_.h_in;
    return s_.nodes[j - 1].state;
  }
  // Its rows in part ``p`` at step ``t`` (contiguous).
  T* state(int64_t t, int64_t j, int64_t p) const { return split_.rows_of<T>(states_of(j), t, p); }

  // ``out`` = the output rule over nodes 1..count at step ``t``, part ``p``'s rows.
  void base_of(int64_t t, int64_t count, int64_t p, T* out) const {
    const auto node = [&](int64_t k) { return state(t, k, p); };
    output_rule(s_.output_mean, count, split_.rows(p) * d_, node, out);
  }

  // What a node reads at every step as ``a`` (``second`` false) or ``b``: a state, or under input
  // choice its own buffer of the mixture; its rows in part ``p`` at step ``t``, and as a view.
  const Tensor& input_of(const Node& node, bool second) const {
    if (node.choice) return second ? *node.b_in : *node.a_in;
    return states_of(second ? node.b : node.a);
  }
  T* input(const Node& node, bool second, int64_t t, int64_t p) const {
    return split_.rows_of<T>(input_of(node, second), t, p);
  }
  Tensor input_view(const Node& node, bool second, int64_t t, int64_t p) const {
    return split_.rows_of(input_of(node, second).select(0, t), p);
  }

  // Input choice: ``a`` and ``b`` at step ``t`` as the slot weights' mixtures of the states.
  void mix_inputs(int64_t t, const Node& node, int64_t p) {
    const T* wa = node.slot_a->data_ptr<T>();
    const T* wb = node.slot_b->data_ptr<T>();
    const int64_t states = node.slot_a->numel(), d = d_;
    T* a = input(node, false, t, p);
    T* b = input(node, true, t, p);
    over_rows(split_.rows(p), d * states, [&](int64_t r0, int64_t r1) {
      const int64_t lo = r0 * d, hi = r1 * d;
      for (int64_t j = lo; j < hi; ++j) a[j] = b[j] = T(0);
      for (int64_t q = 0; q < states; ++q) {
        const T* s = state(t, q - 1, p);
        const T x = wa[q], y = wb[q];
        for (int64_t j = lo; j < hi; ++j) {
          a[j] += x * s[j];
          b[j] += y * s[j];
        }
      }
    });
  }

  // Input choice: what ``d a`` and ``d b`` at step ``t`` send back to each state ``j``,
  // ``P(a = j) d a + P(b = j) d b`` (the slot weights' own gradients are taken in Python).
  void spread_inputs(int64_t t, const Node& node, int64_t p, const T* da, const T* db,
                     const Tensor& d_u) {
    const T* wa = node.slot_a->data_ptr<T>();
    const T* wb = node.slot_b->data_ptr<T>();
    const int64_t states = node.slot_a->numel(), d = d_;
    over_rows(split_.rows(p), d * states, [&](int64_t r0, int64_t r1) {
      const int64_t lo = r0 * d, hi = r1 * d;
      for (int64_t q = 0; q < states; ++q) {
        T* target = d_row(t, q - 1, p, d_u);
        const T x = wa[q], y = wb[q];
        for (int64_t j = lo; j < hi; ++j) target[j] += x * da[j] + y * db[j];
      }
    });
  }

  void node_forward(int64_t t, int64_t i, int64_t p) {
    const Node& node = s_.nodes[i];
    const int64_t d = d_, K = node.n_terms(), R = split_.rows(p), first = split_.first_row(p);
    if (node.choice) mix_inputs(t, node, p);
    if (node.pre.has_value()) {
      Tensor pre_t = split_.rows_of(node.pre->select(0, t), p);
      if (!node.hoisted) at::mm_out(pre_t, input_view(node, true, t, p), *node.w_b);
      if (node.a_cols > 0)
        pre_t.narrow(1, 0, node.a_cols).addmm_(input_view(node, false, t, p), *node.w_a);
    }
    const T* a = input(node, false, t, p);
    const T* b = input(node, true, t, p);
    T* pre = node.pre.has_value() ? split_.rows_of<T>(*node.pre, t, p) : nullptr;
    const int64_t width = node.pre.has_value() ? node.pre->size(2) : 0;
    T* terms = step_of<T>(node.terms, t) + first * d;  // term k's rows: ``k·B·d`` further on
    T* normed = split_.rows_of<T>(node.normed, t, p);
    T* mixed = s_.bn ? bn_slot(s_.bn_pre, t, i, p) : normed;
    const T* w = node.op_w.data_ptr<T>();
    over_rows(R, d * K, [&](int64_t b0, int64_t b1) {
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
            case kOne:
              for (int64_t u = 0; u < d; ++u) mr[u] += wk * term[u];
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
    if (s_.bn) norm_forward(t, i, p, normed);
    if (node.residual) {  // s = base(s_1..s_{i−1}) + γ ⊙ y
      T* s = state(t, i + 1, p);
      base_of(t, i, p, s);
      const T* gm = node.gamma->data_ptr<T>();
      for (int64_t r = 0; r < R; ++r)
        for (int64_t u = 0; u < d; ++u) s[r * d + u] += gm[u] * normed[r * d + u];
    }
  }

  // Node ``i``'s rows of part ``p`` at step ``t`` in a ``(T, N, B, d)`` buffer.
  T* bn_slot(const Tensor& buffer, int64_t t, int64_t i, int64_t p) const {
    return buffer.data_ptr<T>() + ((t * n() + i) * B_ + split_.first_row(p)) * d_;
  }

  // BatchNorm of node ``i`` at step ``t``, from its mixture in ``bn_pre`` into ``out``.
  void norm_forward(int64_t t, int64_t i, int64_t p, T* out) {
    const T* pre = bn_slot(s_.bn_pre, t, i, p);
    T* mean = stat_slot(s_.bn_mean, t, i);
    T* invstd = stat_slot(s_.bn_invstd, t, i);
    if (split_.parts == 1) {
      bn_.forward(pre, out, mean, invstd);
    } else {
      bn_.forward_part(pre, out, split_.rows(p), mean, invstd, pool_, p);
    }
  }

  // Node ``i``'s gradient before its BatchNorm at step ``t``, from ``grad``, the one after it.
  const T* norm_backward(int64_t t, int64_t i, int64_t p, const T* grad) {
    if (!s_.bn) return grad;
    T* d_mixed = parts_[p].d_mixed.template data_ptr<T>();
    const T* pre = bn_slot(s_.bn_pre, t, i, p);
    const T* mean = stat_slot(s_.bn_mean, t, i);
    const T* invstd = stat_slot(s_.bn_invstd, t, i);
    if (split_.parts == 1) {
      bn_.backward(grad, pre, mean, invstd, d_mixed);
    } else {
      bn_.backward_part(grad, pre, split_.rows(p), mean, invstd, d_mixed, pool_, p);
    }
    return d_mixed;
  }

  // Node ``i``'s BatchNorm statistics at step ``t`` in a ``(T, N, d)`` buffer; none in evaluation.
  T* stat_slot(const Tensor& buffer, int64_t t, int64_t i) const {
    return s_.bn_training ? buffer.data_ptr<T>() + (t * n() + i) * d_ : nullptr;
  }

  // Part ``p``'s gradient rows of state ``j`` at this step: ``u``'s are ``d_u``'s at step ``t``.
  T* d_row(int64_t t, int64_t j, int64_t p, const Tensor& d_u) const {
    if (j == -1) return split_.rows_of<T>(d_u, t, p);
    return parts_[p].d_states.template data_ptr<T>() + j * split_.rows(p) * d_;
  }
  Tensor d_row_view(int64_t t, int64_t j, int64_t p, const Tensor& d_u) const {
    if (j == -1) return split_.rows_of(d_u.select(0, t), p);
    return parts_[p].d_states.select(0, j);
  }

  void node_backward(int64_t t, int64_t i, int64_t p, const Tensor& d_u, const OptTensor& d_pre,
                     const OptTensor& d_a_in, const OptTensor& d_b_in) {
    const Node& node = s_.nodes[i];
    Part& part = parts_[p];
    const int64_t d = d_, K = node.n_terms(), R = split_.rows(p), size = R * d;
    T* rows = part.d_states.template data_ptr<T>();
    Tensor d_s = part.d_states.select(0, i + 1);
    if (node.residual) {
      const T* ds = d_s.data_ptr<T>();
      const T* y = split_.rows_of<T>(node.normed, t, p);
      const T* gm = node.gamma->data_ptr<T>();
      T* out = part.scaled.template data_ptr<T>();
      std::vector<double>& dg = part.d_gamma[i];
      for (int64_t r = 0; r < R; ++r)
        for (int64_t u = 0; u < d; ++u) {
          dg[u] += static_cast<double>(ds[r * d + u] * y[r * d + u]);
          out[r * d + u] = ds[r * d + u] * gm[u];
        }
      const auto row_of = [&](int64_t k) { return rows + k * size; };
      output_rule_backward(s_.output_mean, i, size, ds, row_of);
      d_s = part.scaled;
    }
    const T* dm = norm_backward(t, i, p, d_s.data_ptr<T>());
    const T* a = input(node, false, t, p);
    const T* b = input(node, true, t, p);
    T* da = node.choice ? split_.rows_of<T>(*d_a_in, t, p) : d_row(t, node.a, p, d_u);
    T* db = node.choice ? split_.rows_of<T>(*d_b_in, t, p) : d_row(t, node.b, p, d_u);
    const T* pre = node.pre.has_value() ? split_.rows_of<T>(*node.pre, t, p) : nullptr;
    T* dpre = d_pre.has_value() ? split_.rows_of<T>(*d_pre, t, p) : nullptr;
    const int64_t width = node.pre.has_value() ? node.pre->size(2) : 0;
    const T* terms = step_of<T>(node.terms, t) + split_.first_row(p) * d;
    const T* w = node.op_w.data_ptr<T>();
    over_rows(R, d * K, [&](int64_t b0, int64_t b1) {
      std::vector<double> sums(K, 0.0);
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
          sums[k] += dot;
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
            case kOne:
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
      part.chunks.add(b0, std::move(sums));
    });
    part.chunks.merge_into(part.reduced[i]);
    if (d_pre.has_value()) {
      Tensor d_pre_t = split_.rows_of(d_pre->select(0, t), p);
      Tensor d_a = node.choice ? split_.rows_of(d_a_in->select(0, t), p)
                               : d_row_view(t, node.a, p, d_u);
      if (node.a_cols > 0) d_a.addmm_(d_pre_t.narrow(1, 0, node.a_cols), node.w_a->t());
      if (!node.hoisted) {
        Tensor d_b = node.choice ? split_.rows_of(d_b_in->select(0, t), p)
                                 : d_row_view(t, node.b, p, d_u);
        d_b.addmm_(d_pre_t, node.w_b->t());
      }
    }
    if (node.choice) spread_inputs(t, node, p, da, db, d_u);
  }
};

inline void forward(const Sequence& sequence) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the caller's buffers only
  AT_DISPATCH_FLOATING_TYPES(sequence.u.scalar_type(), "two_input_supernet_forward",
                             [&] { Loops<scalar_t>(sequence).forward(); });
}

inline Tensor backward(const Sequence& sequence, const Tensor& grad_out, const Tensor& d_u,
                       const std::vector<OptTensor>& d_pre, const std::vector<Tensor>& d_op_w,
                       const std::vector<Tensor>& d_gamma, const std::vector<OptTensor>& d_a_in,
                       const std::vector<OptTensor>& d_b_in) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor grad = grad_out.contiguous();
  Tensor d_h0;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "two_input_supernet_backward", [&] {
    d_h0 = Loops<scalar_t>(sequence).backward(grad, d_u, d_pre, d_op_w, d_gamma, d_a_in, d_b_in);
  });
  return d_h0;
}

inline void bind(pybind11::module_ m) {
  pybind11::class_<Node>(m, "Node")
      .def(pybind11::init<>())
      .def_readwrite("a", &Node::a)
      .def_readwrite("b", &Node::b)
      .def_readwrite("choice", &Node::choice)
      .def_readwrite("slot_a", &Node::slot_a)
      .def_readwrite("slot_b", &Node::slot_b)
      .def_readwrite("a_in", &Node::a_in)
      .def_readwrite("b_in", &Node::b_in)
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
