// A derived DARTS cell over a whole sequence, forward and backward, in C++: the native twin of
// morphnas/cells/fused_darts_cell.py (the same cell, inputs and formulas; read its docstring).
//
// Why: retraining runs thousands of sequences of the derived cell, and at hidden 64 the Python
// kernel spent about as long calling ATen (about forty calls a time step, forward and backward)
// as multiplying matrices. Here the matmuls stay ATen calls, one per state with children, as in
// the Python kernel; everything elementwise of a node at a step is one pass over its rows: the
// gate and activation of its matmul's columns, the highway blend, the residual and the dropout
// mask in the forward; the three local derivatives and the parent's share in the backward.
//
// Conventions the caller keeps (as for the Python kernel): a ``tanh`` column of a weight block,
// and the ``g`` half of ``x_proj`` and ``w_h``, hold ``2g``, so ``tanh(g) = 2σ(2g) − 1`` and its
// slope with respect to the column is ``(1 − tanh²)/2``; the caller's ``doubled`` carries the 2
// into the weights' gradients. Nothing saved is written by the backward, so a second backward
// (``retain_graph``) reads the same values.
//
// With several intra-op threads the batch's rows are split into parts, one thread each, for the
// whole sequence (common.h's ``in_parts``): a derived cell has no BatchNorm, so the parts never
// wait for one another, and a step opens no parallel region. The buffers keep the batch's row
// order, in which a part's rows of a state are already one matrix.

#pragma once

#include "common.h"

namespace morphnas_native::darts_cell {

// ``f`` of a matmul column ``z`` (``2g`` for tanh), and its slope with respect to ``z`` from
// the value ``a = f``.
template <int64_t Act, typename T>
inline T column_value(T z) {
  if constexpr (Act == kTanh) return T(2) * sigmoid(z) - T(1);
  return activate<Act>(z);
}

template <int64_t Act, typename T>
inline T column_slope(T a) {
  if constexpr (Act == kTanh) return (T(1) - a * a) * T(0.5);
  return slope<Act>(a);
}

struct Plan {
  std::vector<int64_t> parents, acts;  // per node: its input state, its activation
  std::vector<bool> residual, live;    // per node (``CellPlan.live``)
  std::vector<int64_t> group_parents;  // per weight block: the state its children read
  std::vector<std::vector<int64_t>> group_children;  // ... and the children, in column order
  bool output_mean, squash_tanh;
};

// Where a node's columns are: its group, its place among the group's ``k`` children.
struct Slot {
  int64_t group = -1, column = 0, k = 0;
};

// The buffers the backward takes back, in the order the forward returns them (after the
// output); then one ``z`` per group: ``(T, B, 2dk)``, ``[σ(c_1..c_k) | f(g_1..g_k)]``.
enum Saved : size_t { kStates = 0, kMasked, kYs, kHs, kInit, kParts, kGroups };

struct Cell : RowParts {
  const Plan& plan;
  Tensor mask;  // undefined: no dropout mask on h
  std::vector<Tensor> saved;
  std::vector<Slot> slots;               // per node
  std::vector<int64_t> group_of_state;   // per state: the group it feeds, or −1
  std::vector<int64_t> gamma_of_node;    // per node: its γ's index among the residual nodes
  int64_t steps = 0, d = 0;

  Cell(const Plan& p, const Tensor& x_proj, const OptTensor& mask_h) : plan(p) {
    const int64_t n = this->n();
    steps = x_proj.size(0);
    batch = x_proj.size(1);
    d = x_proj.size(2) / 2;
    if (mask_h.has_value()) mask = mask_h->contiguous();
    slots.resize(n);
    group_of_state.assign(n + 1, -1);
    for (size_t g = 0; g < plan.group_parents.size(); ++g) {
      const std::vector<int64_t>& kids = plan.group_children[g];
      group_of_state[plan.group_parents[g]] = static_cast<int64_t>(g);
      for (size_t r = 0; r < kids.size(); ++r)
        slots[kids[r]] = {static_cast<int64_t>(g), static_cast<int64_t>(r),
                          static_cast<int64_t>(kids.size())};
    }
    int64_t residuals = 0;
    for (int64_t i = 0; i < n; ++i) gamma_of_node.push_back(plan.residual[i] ? residuals++ : -1);
  }

  int64_t n() const { return static_cast<int64_t>(plan.parents.size()); }
  // A part's rows of state ``k`` of a ``(T, N+1, B, d)`` buffer (``kYs``: N) at step ``t``.
  template <typename U>
  U* state(Saved which, int64_t t, int64_t k, int64_t part) const {
    const int64_t states = which == kYs ? n() : n() + 1;
    return saved[which].data_ptr<U>() + ((t * states + k) * batch + first_row(part)) * d;
  }
  const Tensor& group_z(int64_t g) const { return saved[kGroups + g]; }
};

// ``out`` = the output rule over s_1..s_count in a part at step ``t``.
template <typename T>
void base_of(const Cell& c, int64_t t, int64_t count, int64_t part, T* out) {
  const auto node = [&](int64_t k) { return c.state<T>(kStates, t, k, part); };
  output_rule(c.plan.output_mean, count, c.rows(part) * c.d, node, out);
}

template <typename T>
class Forward {
 public:
  explicit Forward(Cell& cell) : c_(cell), pool_(cell.parts, 0) {}

  void run(const Tensor& x_proj, const Tensor& h0, const Tensor& w_h,
           const std::vector<Tensor>& blocks, const std::vector<Tensor>& gammas) {
    allocate(x_proj);
    const int64_t d = c_.d, N = c_.n();
    const Tensor hs = c_.saved[kHs], init = c_.saved[kInit], masked_rows = c_.saved[kMasked];
    hs.select(0, 0).copy_(h0);
    in_parts(c_.parts, pool_, [&](int64_t p) {
      const int64_t R = c_.rows(p);
      const Tensor mask = c_.rows_of(c_.mask, p);
      Tensor masked_h = mask.defined() ? at::empty({R, d}, x_proj.options()) : Tensor();
      for (int64_t t = 0; t < c_.steps; ++t) {
        Tensor h = c_.rows_of(hs.select(0, t), p);
        Tensor init_t = c_.rows_of(init.select(0, t), p);
        init_projection(init_t, c_.rows_of(x_proj.select(0, t), p), h, w_h, mask, masked_h);
        init_node(t, p);
        for (int64_t j = 0; j <= N; ++j) {
          if (j > 0) {
            if (!c_.plan.live[j - 1]) continue;  // nothing reads it, and it reads nothing live
            node(t, j - 1, p, gammas);
          }
          const int64_t g = c_.group_of_state[j];
          if (g >= 0) {  // state j is final: its children's matmul
            Tensor z_t = c_.rows_of(c_.group_z(g).select(0, t), p);
            at::mm_out(z_t, c_.rows_of(masked_rows.select(0, t).select(0, j), p), blocks[g]);
          }
        }
        output(t, p);
      }
    });
  }

 private:
  Cell& c_;
  PartPool pool_;  // no sums to pool: its barrier is never met

  void allocate(const Tensor& x_proj) {
    const auto opt = x_proj.options();
    const int64_t T_ = c_.steps, N = c_.n(), B = c_.batch, d = c_.d;
    bool any_residual = false;
    for (bool r : c_.plan.residual) any_residual = any_residual || r;
    Tensor states = at::empty({T_, N + 1, B, d}, opt);
    c_.saved = {states, c_.mask.defined() ? at::empty_like(states) : states,
                any_residual ? at::empty({T_, N, B, d}, opt) : nothing(states),
                at::empty({T_ + 1, B, d}, opt), at::empty({T_, B, 2 * d}, opt),
                at::scalar_tensor(c_.parts, at::kLong)};
    for (const std::vector<int64_t>& kids : c_.plan.group_children)
      c_.saved.push_back(at::empty({T_, B, 2 * d * static_cast<int64_t>(kids.size())}, opt));
  }

  // ``[c₀ | 2g₀]`` in ``init`` turned into ``[σ(c₀) | tanh(g₀)]``; s₀ = h + σ(c₀)(tanh(g₀) − h).
  void init_node(int64_t t, int64_t p) {
    const int64_t d = c_.d;
    T* z = c_.rows_of<T>(c_.saved[kInit], t, p);
    const T* h = c_.rows_of<T>(c_.saved[kHs], t, p);
    T* s0 = c_.state<T>(kStates, t, 0, p);
    T* masked = c_.state<T>(kMasked, t, 0, p);
    const T* mask = c_.mask.defined() ? c_.mask.data_ptr<T>() + c_.first_row(p) * d : nullptr;
    over_rows(c_.rows(p), d, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* gate = z + b * 2 * d;
        T* value = gate + d;
        const T* hb = h + b * d;
        T* s = s0 + b * d;
        highway_row(gate, value, hb, s, d, [](T v) { return column_value<kTanh>(v); });
        if (mask != nullptr)
          for (int64_t u = 0; u < d; ++u) masked[b * d + u] = s[u] * mask[b * d + u];
      }
    });
  }

  // Node ``i``: its columns ``[c | g]`` turned into ``[σ(c) | f(g)]``, ``y = s_p + σ(c)(f − s_p)``,
  // and ``s = y``, or ``base + γ ⊙ y`` for a residual node; then its masked copy.
  void node(int64_t t, int64_t i, int64_t p, const std::vector<Tensor>& gammas) {
    const Slot slot = c_.slots[i];
    const int64_t d = c_.d, width = 2 * d * slot.k, R = c_.rows(p);
    T* z = c_.rows_of<T>(c_.group_z(slot.group), t, p);
    T* gates = z + slot.column * d;
    T* values = z + (slot.k + slot.column) * d;
    const T* parent = c_.state<T>(kStates, t, c_.plan.parents[i], p);
    T* state = c_.state<T>(kStates, t, i + 1, p);
    const bool residual = c_.plan.residual[i];
    T* y = residual ? c_.state<T>(kYs, t, i, p) : state;
    with_activation(c_.plan.acts[i], [&](auto act) {
      over_rows(R, d, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          T* gate = gates + b * width;
          T* value = values + b * width;
          const T* pb = parent + b * d;
          T* yb = y + b * d;
          constexpr int64_t kAct = decltype(act)::value;
          highway_row(gate, value, pb, yb, d, [](T v) { return column_value<kAct>(v); });
        }
      });
    });
    if (residual) {
      base_of(c_, t, i, p, state);
      const T* gm = gammas[c_.gamma_of_node[i]].data_ptr<T>();
      for (int64_t b = 0; b < R; ++b)
        for (int64_t u = 0; u < d; ++u) state[b * d + u] += gm[u] * y[b * d + u];
    }
    if (c_.mask.defined()) {
      const T* mask = c_.mask.data_ptr<T>() + c_.first_row(p) * d;
      T* masked = c_.state<T>(kMasked, t, i + 1, p);
      for (int64_t j = 0; j < R * d; ++j) masked[j] = state[j] * mask[j];
    }
  }

  // h_{t+1} = squash(base(s_1..s_N)), a part's rows.
  void output(int64_t t, int64_t p) {
    T* h = c_.rows_of<T>(c_.saved[kHs], t + 1, p);
    base_of(c_, t, c_.n(), p, h);
    if (c_.plan.squash_tanh)
      for (int64_t j = 0; j < c_.rows(p) * c_.d; ++j) h[j] = tanh_value(h[j]);
  }
};

template <typename T>
class Backward {
 public:
  explicit Backward(const Cell& cell) : c_(cell), pool_(cell.parts, 0) {}

  // Gradients: x_proj, h0, w_h, then per block, then per residual node its γ (empty: dead).
  std::vector<Tensor> run(const Tensor& grad_out, const Tensor& w_h,
                          const std::vector<Tensor>& blocks, const std::vector<Tensor>& gammas) {
    const int64_t T_ = c_.steps, N = c_.n(), B = c_.batch, d = c_.d;
    const auto opt = grad_out.options();
    Tensor d_init = at::empty({T_, B, 2 * d}, opt);
    Tensor carry = at::zeros({B, d}, opt);  // d h_t from step t + 1
    std::vector<Tensor> d_z;
    for (size_t g = 0; g < blocks.size(); ++g) d_z.push_back(at::empty_like(c_.group_z(g)));
    parts_.reserve(c_.parts);
    for (int64_t p = 0; p < c_.parts; ++p) parts_.emplace_back(c_, p, gammas.size(), opt);
    const T share = c_.plan.output_mean ? T(1) / T(N) : T(1);
    in_parts(c_.parts, pool_, [&](int64_t p) {
      const int64_t R = c_.rows(p), size = R * d;
      Part& part = parts_[p];
      Tensor carry_p = c_.rows_of(carry, p);
      for (int64_t t = T_ - 1; t >= 0; --t) {
        T* rows = part.d_states.template data_ptr<T>();
        const T* g = c_.rows_of<T>(grad_out, t, p);
        const T* cp = carry_p.data_ptr<T>();
        const T* h = c_.rows_of<T>(c_.saved[kHs], t + 1, p);
        T* dh = part.scratch.template data_ptr<T>();
        for (int64_t j = 0; j < size; ++j) {
          dh[j] = g[j] + cp[j];
          if (c_.plan.squash_tanh) dh[j] *= T(1) - h[j] * h[j];
        }
        std::fill(rows, rows + (N + 1) * size, T(0));
        for (int64_t k = c_.plan.output_mean ? 1 : N; k <= N; ++k)
          for (int64_t j = 0; j < size; ++j) rows[k * size + j] = dh[j] * share;
        for (int64_t j = N; j >= 0; --j) {
          const int64_t grp = c_.group_of_state[j];
          if (grp >= 0) {  // all children of state j are done: d(m ⊙ s_j)
            Tensor dz_t = c_.rows_of(d_z[grp].select(0, t), p);
            for (int64_t i : c_.plan.group_children[grp]) child(t, i, p, dz_t);
            add_masked_product<T>(part.d_states.select(0, j), dz_t, blocks[grp].t(),
                                  c_.rows_of(c_.mask, p), part.product);
          }
          if (j == 0) break;
          const int64_t i = j - 1;
          if (c_.plan.live[i] && c_.plan.residual[i]) residual(t, i, p, gammas);
        }
        init_node(t, p, c_.rows_of(d_init.select(0, t), p), carry_p, w_h);
      }
    });
    Tensor h_in = c_.saved[kHs].narrow(0, 0, T_);
    if (c_.mask.defined()) h_in = h_in.mul(c_.mask);
    std::vector<Tensor> grads = {
        d_init, carry, at::mm(h_in.reshape({T_ * B, d}).t(), d_init.view({T_ * B, 2 * d}))};
    const Tensor& masked = c_.saved[kMasked];
    for (size_t grp = 0; grp < blocks.size(); ++grp) {
      Tensor inputs = masked.select(1, c_.plan.group_parents[grp]).reshape({T_ * B, d});
      grads.push_back(at::mm(inputs.t(), d_z[grp].view({T_ * B, -1})));
    }
    for (int64_t i = 0; i < N; ++i) {
      if (!c_.plan.residual[i]) continue;
      if (!c_.plan.live[i]) {
        grads.push_back(nothing(grad_out));
        continue;
      }
      Tensor dg = at::empty({d}, opt);
      for (int64_t u = 0; u < d; ++u) {  // the parts' sums, in part order
        double total = 0.0;
        for (const Part& part : parts_) total += part.d_gammas[c_.gamma_of_node[i]][u];
        dg.data_ptr<T>()[u] = static_cast<T>(total);
      }
      grads.push_back(dg);
    }
    return grads;
  }

 private:
  // What one part's thread keeps: its rows' gradients of a step's states, room for a matmul's
  // rows, and its share of γ's gradient.
  struct Part {
    Tensor d_states, scratch, product;
    std::vector<std::vector<double>> d_gammas;  // per residual node, Σ_t,b ds ⊙ y

    Part(const Cell& c, int64_t p, size_t residuals, const at::TensorOptions& opt)
        : d_states(at::empty({c.n() + 1, c.rows(p), c.d}, opt)),
          scratch(at::empty({c.rows(p), c.d}, opt)),
          product(at::empty({c.rows(p), c.d}, opt)),
          d_gammas(residuals, std::vector<double>(c.d, 0.0)) {}
  };

  const Cell& c_;
  PartPool pool_;  // no sums to pool: its barrier is never met
  std::vector<Part> parts_;

  // Node ``i``'s ``[dc | dg]`` columns in a part at step ``t`` from its final ``d s``:
  // ``(f − s_p) σ(1 − σ) ds`` and ``σ f' ds``; and its parent's share ``(1 − σ) ds``.
  void child(int64_t t, int64_t i, int64_t p, Tensor& dz_t) {
    const Slot slot = c_.slots[i];
    const int64_t R = c_.rows(p), d = c_.d, width = 2 * d * slot.k;
    const int64_t parent_state = c_.plan.parents[i];
    const T* z = c_.rows_of<T>(c_.group_z(slot.group), t, p);
    const T* gates = z + slot.column * d;
    const T* values = z + (slot.k + slot.column) * d;
    T* dz = dz_t.data_ptr<T>();
    T* d_gates = dz + slot.column * d;
    T* d_values = dz + (slot.k + slot.column) * d;
    const T* parent = c_.state<T>(kStates, t, parent_state, p);
    T* rows = parts_[p].d_states.template data_ptr<T>();
    const T* ds = rows + (i + 1) * R * d;
    T* d_parent = rows + parent_state * R * d;
    with_activation(c_.plan.acts[i], [&](auto act) {
      over_rows(R, d, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const T* gate = gates + b * width;
          const T* value = values + b * width;
          T* dgate = d_gates + b * width;
          T* dvalue = d_values + b * width;
          const T* sp = parent + b * d;
          const T* dsb = ds + b * d;
          T* dp = d_parent + b * d;
          for (int64_t u = 0; u < d; ++u) {
            const T c = gate[u], f = value[u], dy = dsb[u];
            dgate[u] = dy * (f - sp[u]) * c * (T(1) - c);
            dvalue[u] = dy * c * column_slope<decltype(act)::value>(f);
            dp[u] += dy * (T(1) - c);
          }
        }
      });
    });
  }

  // A residual node's final ``d s_i`` in a part: ``γ``'s share, the base's
  // (``output_rule_backward``), then ``γ ⊙ d s_i`` left in its row for the op.
  void residual(int64_t t, int64_t i, int64_t p, const std::vector<Tensor>& gammas) {
    const int64_t R = c_.rows(p), d = c_.d, size = R * d;
    T* rows = parts_[p].d_states.template data_ptr<T>();
    T* ds = rows + (i + 1) * size;
    const T* y = c_.state<T>(kYs, t, i, p);
    const T* gm = gammas[c_.gamma_of_node[i]].data_ptr<T>();
    std::vector<double>& dg = parts_[p].d_gammas[c_.gamma_of_node[i]];
    for (int64_t b = 0; b < R; ++b)
      for (int64_t u = 0; u < d; ++u) dg[u] += static_cast<double>(ds[b * d + u] * y[b * d + u]);
    const auto row_of = [&](int64_t k) { return rows + k * size; };
    output_rule_backward(c_.plan.output_mean, i, size, ds, row_of);
    for (int64_t b = 0; b < R; ++b)
      for (int64_t u = 0; u < d; ++u) ds[b * d + u] *= gm[u];
  }

  // The init node in a part: ``[dc₀ | dg₀]`` into ``d_init_t``, then ``carry`` = d h_{t−1}
  // (before the output's gradient of step t − 1, which the next step adds).
  void init_node(int64_t t, int64_t p, Tensor d_init_t, Tensor& carry, const Tensor& w_h) {
    const int64_t d = c_.d;
    const T* ds = parts_[p].d_states.template data_ptr<T>();
    const T* z = c_.rows_of<T>(c_.saved[kInit], t, p);
    const T* h = c_.rows_of<T>(c_.saved[kHs], t, p);
    T* dz = d_init_t.data_ptr<T>();
    T* cp = carry.data_ptr<T>();
    over_rows(c_.rows(p), d, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t u = 0; u < d; ++u) {
          const int64_t j = b * d + u;
          const T c0 = z[b * 2 * d + u], f0 = z[b * 2 * d + d + u], dy = ds[j];
          dz[b * 2 * d + u] = dy * (f0 - h[j]) * c0 * (T(1) - c0);
          dz[b * 2 * d + d + u] = dy * c0 * column_slope<kTanh>(f0);
          cp[j] = dy * (T(1) - c0);
        }
    });
    add_masked_product<T>(carry, d_init_t, w_h.t(), c_.rows_of(c_.mask, p), parts_[p].product);
  }
};

// Returns the output ``(T, B, d)``, then the buffers ``backward`` takes back (``Saved``).
inline std::vector<Tensor> forward(const Plan& plan, const Tensor& x_proj, const Tensor& h0,
                                   const Tensor& w_h, const OptTensor& mask_h,
                                   const std::vector<Tensor>& blocks,
                                   const std::vector<Tensor>& gammas) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // our own buffers only
  const Tensor xp = x_proj.contiguous();
  Cell cell(plan, xp, mask_h);
  cell.parts = batch_parts(cell.batch);
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "darts_cell_forward", [&] {
    Forward<scalar_t>(cell).run(xp, h0, w_h.contiguous(), contiguous(blocks), contiguous(gammas));
  });
  std::vector<Tensor> result = {cell.saved[kHs].narrow(0, 1, cell.steps).clone()};
  result.insert(result.end(), cell.saved.begin(), cell.saved.end());
  return result;
}

inline std::vector<Tensor> backward(const Plan& plan, const Tensor& grad_out,
                                    const std::vector<Tensor>& saved, const Tensor& w_h,
                                    const OptTensor& mask_h, const std::vector<Tensor>& blocks,
                                    const std::vector<Tensor>& gammas) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // our own buffers only
  const Tensor grad = grad_out.contiguous();
  Cell cell(plan, saved[kInit], mask_h);
  cell.saved = saved;
  cell.parts = saved[kParts].item<int64_t>();
  std::vector<Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "darts_cell_backward", [&] {
    grads = Backward<scalar_t>(cell).run(grad, w_h.contiguous(), contiguous(blocks),
                                         contiguous(gammas));
  });
  return grads;
}

inline void bind(pybind11::module_ m) {
  pybind11::class_<Plan>(m, "Plan")
      .def(pybind11::init<std::vector<int64_t>, std::vector<int64_t>, std::vector<bool>,
                          std::vector<bool>, std::vector<int64_t>,
                          std::vector<std::vector<int64_t>>, bool, bool>());
  m.def("forward", &forward);
  m.def("backward", &backward);
}

}  // namespace morphnas_native::darts_cell
