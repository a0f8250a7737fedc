// The time loops of a derived two-input cell, forward and backward, in C++: the native twin of
// the loops in morphnas/cells/fused_two_input_cell.py (read its docstring first).
//
// Why: as for the derived DARTS cell (darts_cell.h), the Python loops call ATen a few dozen
// times a step, and at hidden 64 that costs as much as the arithmetic. Only the loops are here:
// the Python kernel's per-sequence work (the matmuls on ``u`` hoisted before the loop, the
// buffers, every weight gradient after it) is shared by both kernels and stays in Python; these
// functions fill the same buffers the Python loops fill. The matmuls inside the loop stay ATen
// calls; each node's elementwise op at a step is one pass over its rows. With more than one
// intra-op thread the batch is split into parts, one a thread, for the whole sequence (``Loops``).
//
// Slots, as in the Python kernel: ``u`` (0), ``m ⊙ h`` (1), node ``i`` (``i + 2``). A highway's
// matmul yields ``[c | 2g]`` (its ``H`` comes doubled), so ``tanh(g) = 2σ(2g) − 1``. The
// backward writes nothing the forward saved, so a second backward reads the same values.

#pragma once

#include "common.h"

namespace morphnas_native::two_input_cell {

enum Op : int64_t { kAddAct = 0, kHighway = 1, kHadamard = 2, kAdd = 3 };
constexpr int64_t kU = 0, kH = 1;

struct Plan {
  std::vector<int64_t> ops, acts, a, b;  // per node: its op, an add op's activation, its slots
  std::vector<bool> residual, live;
  bool output_mean, squash_tanh;
  int64_t n() const { return static_cast<int64_t>(ops.size()); }
};

// The sequence's buffers, as the Python kernel made them; per node ``None`` where it has none.
struct Buffers {
  Tensor u, states, hs;  // (T, B, d); (T, N+2, B, d), slot ``m ⊙ h`` written only with a mask
  OptTensor mask, shared, block;
  std::vector<OptTensor> z, ys, gammas;  // per node: pre-activations, op outputs, γ
  std::vector<std::vector<int64_t>> recurrent_slots;  // per node: the slots of its matmuls ...
  std::vector<std::vector<Tensor>> recurrent_weights;  // ... that read other nodes, and weights
};

// One node's ``z`` at step ``t``: rows ``b`` at ``row(b)`` (a view into the shared buffer for
// a node with a term on ``m ⊙ h``: its rows are strided).
// One node's ``z`` at step ``t``, part ``p``'s rows: row ``b`` at ``row(b)`` (a view into the
// shared buffer for a node with a term on ``m ⊙ h``: its rows are strided).
template <typename T>
struct Rows {
  T* base;
  int64_t stride;
  T* row(int64_t b) const { return base + b * stride; }
};

template <typename T>
Rows<T> rows_at(const Tensor& z, int64_t t, int64_t first_row) {
  return {z.data_ptr<T>() + t * z.stride(0) + first_row * z.stride(1), z.stride(1)};
}

// The loops over one sequence, the batch's rows in parts, one thread each, for the whole
// sequence (common.h's ``in_parts``), as in the derived DARTS cell: nothing here sums over the
// batch, so the parts never wait for one another.
template <typename T>
class Loops {
 public:
  Loops(const Plan& plan, const Buffers& buffers)
      : p_(plan), s_(buffers), B_(buffers.u.size(1)), d_(buffers.u.size(2)),
        split_{B_, batch_parts(B_)}, pool_(split_.parts, 0) {}

  void forward() {
    const int64_t N = p_.n();
    in_parts(split_.parts, pool_, [&](int64_t p) {
      const int64_t R = split_.rows(p), size = R * d_;
      const T* m = s_.mask.has_value() ? split_.rows_of(*s_.mask, p).data_ptr<T>() : nullptr;
      for (int64_t t = 0; t < s_.u.size(0); ++t) {
        if (m != nullptr) {
          const T* h = split_.rows_of<T>(s_.hs, t, p);
          T* out = slot(t, kH, p);
          for (int64_t j = 0; j < size; ++j) out[j] = h[j] * m[j];
        }
        if (s_.shared.has_value())
          split_.rows_of(s_.shared->select(0, t), p).addmm_(slot_view(t, kH, p), *s_.block);
        for (int64_t i = 0; i < N; ++i) {
          if (!p_.live[i]) continue;
          for (size_t r = 0; r < s_.recurrent_slots[i].size(); ++r)
            split_.rows_of(s_.z[i]->select(0, t), p)
                .addmm_(slot_view(t, s_.recurrent_slots[i][r], p), s_.recurrent_weights[i][r]);
          T* out = y_or_state(t, i, p);
          op_forward(t, i, p, out);
          if (p_.residual[i]) {  // s = base(s_1..s_{i−1}) + γ ⊙ y
            T* state = slot(t, i + 2, p);
            base_of(t, i, p, state);
            const T* gm = s_.gammas[i]->template data_ptr<T>();
            for (int64_t b = 0; b < R; ++b)
              for (int64_t u = 0; u < d_; ++u) state[b * d_ + u] += gm[u] * out[b * d_ + u];
          }
        }
        T* h = split_.rows_of<T>(s_.hs, t + 1, p);
        base_of(t, N, p, h);
        if (p_.squash_tanh)
          for (int64_t j = 0; j < size; ++j) h[j] = tanh_value(h[j]);
      }
    });
  }

  // Fills ``d_u`` (the gradient of slot ``u`` but for the hoisted matmuls', which the caller
  // adds), ``dz`` (per node with matmuls: d pre-activation, or d ``[c | 2g]``), ``d_res`` (a
  // residual node's ``d s`` before ``γ``) and returns d h0.
  Tensor backward(const Tensor& grad_out, const Tensor& d_u, const std::vector<OptTensor>& dz,
                  const std::vector<OptTensor>& d_res, const OptTensor& d_shared) {
    const int64_t N = p_.n(), steps = s_.u.size(0);
    const auto opt = grad_out.options();
    Tensor carry = at::zeros({B_, d_}, opt);
    for (int64_t p = 0; p < split_.parts; ++p) {
      d_states_.push_back(at::empty({N + 2, split_.rows(p), d_}, opt));
      scratch_.push_back(at::empty({split_.rows(p), d_}, opt));
    }
    std::vector<Tensor> weights_t;
    for (int64_t i = 0; i < N; ++i)
      for (const Tensor& w : s_.recurrent_weights[i]) weights_t.push_back(w.t());
    const Tensor block_t = s_.block.has_value() ? s_.block->t() : Tensor();
    const T share = p_.output_mean ? T(1) / T(N) : T(1);
    in_parts(split_.parts, pool_, [&](int64_t p) {
      const int64_t size = split_.rows(p) * d_;
      const Tensor d_states = d_states_[p];
      T* rows = d_states.data_ptr<T>();
      T* scratch = scratch_[p].data_ptr<T>();
      T* c = split_.rows_of(carry, p).data_ptr<T>();
      const T* m = s_.mask.has_value() ? split_.rows_of(*s_.mask, p).data_ptr<T>() : nullptr;
      for (int64_t t = steps - 1; t >= 0; --t) {
        const T* g = split_.rows_of<T>(grad_out, t, p);
        const T* h = split_.rows_of<T>(s_.hs, t + 1, p);
        for (int64_t j = 0; j < size; ++j) {
          scratch[j] = g[j] + c[j];
          if (p_.squash_tanh) scratch[j] *= T(1) - h[j] * h[j];
        }
        std::fill(rows, rows + (N + 2) * size, T(0));
        for (int64_t k = p_.output_mean ? 1 : N; k <= N; ++k)
          for (int64_t j = 0; j < size; ++j) rows[(k + 1) * size + j] = scratch[j] * share;
        size_t w_index = weights_t.size();
        for (int64_t i = N - 1; i >= 0; --i) {
          const size_t terms = s_.recurrent_slots[i].size();
          w_index -= terms;
          if (!p_.live[i]) continue;
          T* ds = rows + (i + 2) * size;
          if (p_.residual[i]) {
            std::memcpy(split_.rows_of<T>(*d_res[i], t, p), ds, size * sizeof(T));
            residual_backward(i, p, ds, scratch);
            ds = scratch;
          }
          op_backward(t, i, p, ds, dz[i]);
          for (size_t r = 0; r < terms; ++r)
            d_states.select(0, s_.recurrent_slots[i][r])
                .addmm_(split_.rows_of(dz[i]->select(0, t), p), weights_t[w_index + r]);
        }
        if (d_shared.has_value())
          d_states.select(0, kH).addmm_(split_.rows_of(d_shared->select(0, t), p), block_t);
        std::memcpy(split_.rows_of<T>(d_u, t, p), rows + kU * size, size * sizeof(T));
        const T* dm = rows + kH * size;  // d (m ⊙ h_{t−1}): d h_{t−1} = m ⊙ that
        for (int64_t j = 0; j < size; ++j) c[j] = m != nullptr ? dm[j] * m[j] : dm[j];
      }
    });
    return carry;
  }

 private:
  const Plan& p_;
  const Buffers& s_;
  const int64_t B_, d_;
  const RowParts split_;
  PartPool pool_;                          // no sums to pool: its barrier is never met
  std::vector<Tensor> d_states_, scratch_;  // per part: (N + 2, R, d), (R, d)

  // Slot ``k`` at step ``t``, part ``p``'s rows (contiguous), and as a view for ATen.
  T* slot(int64_t t, int64_t k, int64_t p) const {
    if (k == kU) return split_.rows_of<T>(s_.u, t, p);
    if (k == kH && !s_.mask.has_value()) return split_.rows_of<T>(s_.hs, t, p);
    return s_.states.data_ptr<T>() + ((t * (p_.n() + 2) + k) * B_ + split_.first_row(p)) * d_;
  }
  Tensor slot_view(int64_t t, int64_t k, int64_t p) const {
    if (k == kU) return split_.rows_of(s_.u.select(0, t), p);
    if (k == kH && !s_.mask.has_value()) return split_.rows_of(s_.hs.select(0, t), p);
    return split_.rows_of(s_.states.select(0, t).select(0, k), p);
  }
  T* y_or_state(int64_t t, int64_t i, int64_t p) const {
    return s_.ys[i].has_value() ? split_.rows_of<T>(*s_.ys[i], t, p) : slot(t, i + 2, p);
  }

  // ``out`` = the output rule over nodes 1..count at step ``t``, part ``p``'s rows.
  void base_of(int64_t t, int64_t count, int64_t p, T* out) const {
    const auto node = [&](int64_t k) { return slot(t, k + 1, p); };
    output_rule(p_.output_mean, count, split_.rows(p) * d_, node, out);
  }

  void op_forward(int64_t t, int64_t i, int64_t p, T* out) {
    const T* a = slot(t, p_.a[i], p);
    const T* bb = slot(t, p_.b[i], p);
    const int64_t d = d_, R = split_.rows(p);
    switch (p_.ops[i]) {
      case kAddAct: {  // z keeps the pre-activation (relu's backward reads its sign)
        const Rows<T> z = rows_at<T>(*s_.z[i], t, split_.first_row(p));
        with_activation(p_.acts[i], [&](auto act) {
          over_rows(R, d, [&](int64_t b0, int64_t b1) {
            for (int64_t b = b0; b < b1; ++b) {
              const T* zb = z.row(b);
              T* o = out + b * d;
              for (int64_t u = 0; u < d; ++u) o[u] = activate<decltype(act)::value>(zb[u]);
            }
          });
        });
        return;
      }
      case kHighway: {  // [c | 2g] → [σ(c) | tanh(g)]; a + σ(c)(tanh(g) − a)
        const Rows<T> z = rows_at<T>(*s_.z[i], t, split_.first_row(p));
        over_rows(R, d, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            T* gate = z.row(b);
            T* value = gate + d;
            const T* ab = a + b * d;
            T* o = out + b * d;
            highway_row(gate, value, ab, o, d, [](T v) { return T(2) * sigmoid(v) - T(1); });
          }
        });
        return;
      }
      case kHadamard:
        for (int64_t j = 0; j < R * d; ++j) out[j] = a[j] * bb[j];
        return;
      default:
        for (int64_t j = 0; j < R * d; ++j) out[j] = a[j] + bb[j];
    }
  }

  // A residual node's ``d s``: ``γ``'s and the base's shares; ``γ ⊙ d s`` into ``out``, the op's.
  void residual_backward(int64_t i, int64_t p, const T* ds, T* out) {
    const int64_t R = split_.rows(p), size = R * d_;
    T* rows = d_states_[p].data_ptr<T>();
    const auto row_of = [&](int64_t k) { return rows + (k + 1) * size; };  // node k: slot k + 1
    output_rule_backward(p_.output_mean, i, size, ds, row_of);
    const T* gm = s_.gammas[i]->template data_ptr<T>();
    for (int64_t b = 0; b < R; ++b)
      for (int64_t u = 0; u < d_; ++u) out[b * d_ + u] = ds[b * d_ + u] * gm[u];
  }

  // The op's gradient at step ``t`` from ``ds``: into ``dz`` for its matmuls, and into its
  // inputs' rows of the part's ``d_states_`` for what reads them directly.
  void op_backward(int64_t t, int64_t i, int64_t p, const T* ds, const OptTensor& dz) {
    const int64_t d = d_, R = split_.rows(p), size = R * d_, first = split_.first_row(p);
    T* rows = d_states_[p].data_ptr<T>();
    T* da = rows + p_.a[i] * size;
    T* db = rows + p_.b[i] * size;
    switch (p_.ops[i]) {
      case kAddAct: {  // slopes from the value (tanh, sigmoid) or the pre-activation (relu)
        const Rows<T> z = rows_at<T>(*s_.z[i], t, first);
        const Rows<T> dzr = rows_at<T>(*dz, t, first);
        const T* value = y_or_state(t, i, p);
        with_activation(p_.acts[i], [&](auto act) {
          constexpr int64_t kAct = decltype(act)::value;
          over_rows(R, d, [&](int64_t b0, int64_t b1) {
            for (int64_t b = b0; b < b1; ++b) {
              const T* v = kAct == kRelu ? z.row(b) : value + b * d;
              T* o = dzr.row(b);
              for (int64_t u = 0; u < d; ++u) o[u] = ds[b * d + u] * slope<kAct>(v[u]);
            }
          });
        });
        return;
      }
      case kHighway: {
        const Rows<T> z = rows_at<T>(*s_.z[i], t, first);
        const Rows<T> dzr = rows_at<T>(*dz, t, first);
        const T* a = slot(t, p_.a[i], p);
        over_rows(R, d, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const T* gate = z.row(b);
            const T* value = gate + d;
            T* dgate = dzr.row(b);
            T* dvalue = dgate + d;
            for (int64_t u = 0; u < d; ++u) {
              const int64_t j = b * d + u;
              const T c = gate[u], v = value[u], dy = ds[j];
              dgate[u] = dy * (v - a[j]) * c * (T(1) - c);
              dvalue[u] = dy * c * (T(1) - v * v) * T(0.5);
              da[j] += dy * (T(1) - c);
            }
          }
        });
        return;
      }
      case kHadamard: {
        const T* a = slot(t, p_.a[i], p);
        const T* bb = slot(t, p_.b[i], p);
        for (int64_t j = 0; j < size; ++j) da[j] += ds[j] * bb[j];
        for (int64_t j = 0; j < size; ++j) db[j] += ds[j] * a[j];
        return;
      }
      default:
        for (int64_t j = 0; j < size; ++j) da[j] += ds[j];
        for (int64_t j = 0; j < size; ++j) db[j] += ds[j];
    }
  }
};

inline void forward(const Plan& plan, const Buffers& buffers) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the caller's buffers only
  AT_DISPATCH_FLOATING_TYPES(buffers.u.scalar_type(), "two_input_cell_forward", [&] {
    Loops<scalar_t>(plan, buffers).forward();
  });
}

inline Tensor backward(const Plan& plan, const Buffers& buffers, const Tensor& grad_out,
                       const Tensor& d_u, const std::vector<OptTensor>& dz,
                       const std::vector<OptTensor>& d_res, const OptTensor& d_shared) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor grad = grad_out.contiguous();
  Tensor d_h0;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "two_input_cell_backward", [&] {
    d_h0 = Loops<scalar_t>(plan, buffers).backward(grad, d_u, dz, d_res, d_shared);
  });
  return d_h0;
}

inline void bind(pybind11::module_ m) {
  pybind11::class_<Plan>(m, "Plan")
      .def(pybind11::init<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                          std::vector<int64_t>, std::vector<bool>, std::vector<bool>, bool,
                          bool>());
  pybind11::class_<Buffers>(m, "Buffers")
      .def(pybind11::init<Tensor, Tensor, Tensor, OptTensor, OptTensor, OptTensor,
                          std::vector<OptTensor>, std::vector<OptTensor>, std::vector<OptTensor>,
                          std::vector<std::vector<int64_t>>, std::vector<std::vector<Tensor>>>());
  m.def("forward", &forward);
  m.def("backward", &backward);
}

}  // namespace morphnas_native::two_input_cell
