// The DARTS search cell over a whole sequence, forward and backward, in C++: the native twin of
// morphnas/spaces/fused_darts.py (the same cell and formulas; read its docstring first).
//
// Why: at search sizes on a CPU the Python kernel spends about as long calling ATen (thousands
// of calls a step, 5–20 µs each) as computing. Here the matmuls stay ATen calls; everything
// elementwise of a node at a step is one pass over its rows, and the reductions the activation
// weights' gradient needs are taken in that pass instead of over saved buffers. BatchNorm is
// common.h's ``RowNorm`` (ATen's formulas, on the module's running buffers, without its calls).
// The loops are plain arithmetic so that -O3 -march=native vectorises them, exp included.
// With several intra-op threads the batch's rows are split into parts, one thread each, for the
// whole sequence (``Cell``, common.h's ``in_parts``): the parts meet only where BatchNorm pools
// its column sums, instead of every loop and matmul of every step opening a parallel region.

#pragma once

#include "common.h"

namespace morphnas_native::darts_supernet {

struct Node {
  int64_t start, edges;
  std::vector<int64_t> acts;
  bool residual;
  // Whether the activations are DARTS's four (tanh, σ, relu, identity, in any order), and
  // their slots in ``acts`` in that order: ``StandardEdge`` then takes each edge in one pass.
  bool standard = false;
  std::array<int64_t, 4> slots{};

  Node(int64_t start_, int64_t edges_, std::vector<int64_t> acts_, bool residual_)
      : start(start_), edges(edges_), acts(std::move(acts_)), residual(residual_) {
    if (acts.size() != 4) return;
    standard = true;
    for (int64_t act : {kTanh, kSigmoid, kRelu, kIdentity}) {
      const auto found = std::find(acts.begin(), acts.end(), act);
      standard = standard && found != acts.end();
      if (standard) slots[act] = found - acts.begin();
    }
  }
  int64_t n_acts() const { return static_cast<int64_t>(acts.size()); }
};

// The cell's BatchNorm (no affine) on the module's own running buffers, which are absent when
// a functional call freezes them (training then uses batch statistics only); off unless ``on``.
struct Norm {
  bool on = false, training = false;
  OptTensor running_mean, running_var;
  Tensor scale;  // 1/sqrt(var + eps), in evaluation
  double momentum = 0.0, eps = 0.0;
};

// The buffers the backward takes back, in the order the forward returns them (after the output).
enum Saved : size_t {
  kStates = 0, kMasked, kHs, kInit, kPre, kMean, kInvstd, kScale, kParts, kPerNode
};
enum NodeSaved : size_t { kZ = 0, kNormed, kNodeBuffers };

// The cell and its buffers. The batch's rows are split into ``parts``, each run by its own
// thread (common.h's ``in_parts``), and the buffers that hold several states or edges a step
// keep each part's rows together: a step's block is its parts one after the other, each with
// its states (or edges) one after the other, so that a node's inputs in a part are one matrix.
// Buffers of one state a step (``kHs``, ``kInit``, ``kNormed``) keep the batch's row order.
struct Cell : RowParts {
  std::vector<Node> nodes;
  Norm norm;
  Tensor mask;  // undefined: no dropout mask on h
  std::vector<Tensor> saved;
  int64_t steps = 0, d = 0;

  int64_t n() const { return static_cast<int64_t>(nodes.size()); }
  // The first row of item ``k`` in part ``part`` at step ``t`` of a buffer of ``items`` a step.
  int64_t row_of(int64_t t, int64_t items, int64_t k, int64_t part) const {
    return t * items * batch + items * first_row(part) + k * rows(part);
  }
  const Tensor& node_buffer(int64_t i, NodeSaved which) const {
    return saved[kPerNode + kNodeBuffers * i + which];
  }
  // Node ``i``'s inputs in a part at step ``t`` (masked states ``start..stop−1``),
  // ``(edges·rows, d)``.
  Tensor inputs(int64_t t, int64_t i, int64_t part) const {
    const Node& node = nodes[i];
    return masked_rows.narrow(0, row_of(t, n() + 1, node.start, part), node.edges * rows(part));
  }
  // Node ``i``'s ``[c | g]`` in a part at step ``t``, ``(edges·rows, 2d)``.
  Tensor z_rows(int64_t t, int64_t i, int64_t part) const {
    const int64_t m = nodes[i].edges;
    return z_by_row[i].narrow(0, row_of(t, m, 0, part), m * rows(part));
  }
  template <typename T>
  T* z_ptr(int64_t t, int64_t i, int64_t part) const {
    return node_buffer(i, kZ).data_ptr<T>() + row_of(t, nodes[i].edges, 0, part) * 2 * d;
  }
  // The views above, made once per call rather than once per step (after ``saved`` is set).
  void index() {
    masked_rows = saved[kMasked].view({-1, d});
    for (int64_t i = 0; i < n(); ++i) z_by_row.push_back(node_buffer(i, kZ).view({-1, 2 * d}));
  }
  Tensor masked_rows;
  std::vector<Tensor> z_by_row;
  template <typename T>
  T* state_ptr(Saved which, int64_t t, int64_t k, int64_t part) const {
    return saved[which].data_ptr<T>() + row_of(t, n() + 1, k, part) * d;
  }
  // State ``k``'s BatchNorm statistics (``kMean``, ``kInvstd``) at step ``t``; none in evaluation.
  template <typename T>
  T* stat_ptr(Saved which, int64_t t, int64_t k) const {
    if (!norm.training) return nullptr;
    return saved[which].data_ptr<T>() + (t * (n() + 1) + k) * d;
  }
  template <typename T>
  RowNorm<T> row_norm() const {
    if (!norm.on) return RowNorm<T>();
    return morphnas_native::row_norm<T>(norm.training, norm.running_mean, norm.running_var,
                                        norm.scale, norm.momentum, norm.eps, batch, d);
  }
};


// Per node its activation weights ``w_jk`` (edges × acts) and per edge ``W_j = Σ_k w_jk``.
template <typename T>
struct Mixing {
  std::vector<std::vector<T>> weights, edge_sums;

  Mixing(const std::vector<Node>& nodes, const std::vector<Tensor>& act_w) {
    for (size_t i = 0; i < nodes.size(); ++i) {
      const int64_t m = nodes[i].edges, n_acts = nodes[i].n_acts();
      const T* w = act_w[i].data_ptr<T>();
      weights.emplace_back(w, w + m * n_acts);
      std::vector<T> sums(m, T(0));
      for (int64_t e = 0; e < m; ++e)
        for (int64_t k = 0; k < n_acts; ++k) sums[e] += w[e * n_acts + k];
      edge_sums.push_back(std::move(sums));
    }
  }
};

// One edge's row: ``f_k(g)`` per activation into ``work`` (``n_acts`` rows of ``d``), then
// ``F − W s = Σ_k w_k f_k(g) − (Σ_k w_k) s`` into the row after them. The forward and the
// backward both compute it rather than save it: at the DARTS size, saving the activations and
// the blend would write and read back 1.9 GB a step, and memory traffic bounds these loops.
template <typename T>
void blend_row(const Node& spec, const T* mix, T w_sum, const T* g, const T* p, T* work,
               int64_t d) {
  const int64_t n_acts = spec.n_acts();
  T* bl = work + n_acts * d;
  for (int64_t u = 0; u < d; ++u) bl[u] = -w_sum * p[u];
  for (int64_t k = 0; k < n_acts; ++k) {
    T* a = work + k * d;
    const T w = mix[k];
    with_activation(spec.acts[k], [&](auto act) {
      for (int64_t u = 0; u < d; ++u) bl[u] += w * (a[u] = activate<act>(g[u]));
    });
  }
}

// One edge of a node with DARTS's four activations (``Node::standard``), in one pass over its
// row: the activations stay in registers instead of going through rows of ``work`` one
// activation at a time (``blend_row``), tanh and σ come from one exp, and the backward takes
// its five sums in the same pass. The formulas are the general path's.
template <typename T>
struct StandardEdge {
  T w_tanh, w_sigmoid, w_relu, w_identity, w_sum;

  StandardEdge(const Node& spec, const T* mix, T sum)
      : w_tanh(mix[spec.slots[kTanh]]),
        w_sigmoid(mix[spec.slots[kSigmoid]]),
        w_relu(mix[spec.slots[kRelu]]),
        w_identity(mix[spec.slots[kIdentity]]),
        w_sum(sum) {}

  // F − W s, summed in the order of ``blend_row`` (−W s, then DARTS's tanh, relu, σ, identity).
  T blend_of(T th, T sg, T relu, T g, T p) const {
    T blend = -w_sum * p;
    blend += w_tanh * th;
    blend += w_relu * relu;
    blend += w_sigmoid * sg;
    blend += w_identity * g;
    return blend;
  }

  // The row ``[c | g]`` (``gate``, then ``g``) turned into ``[σ(c) | g]``; ``r`` = (``First``)
  // or += the edge's share, W s + σ(c)(F − W s).
  template <bool First>
  void forward(T* gate, const T* g, const T* p, T* r, int64_t d) const {
    for (int64_t u = 0; u < d; ++u) {
      const T c = sigmoid(gate[u]);
      gate[u] = c;
      T th, sg;
      tanh_and_sigmoid(g[u], th, sg);
      const T relu = g[u] > T(0) ? g[u] : T(0);
      const T blend = blend_of(th, sg, relu, g[u], p[u]);
      const T out = w_sum * p[u] + c * blend;
      if constexpr (First) {
        r[u] = out;
      } else {
        r[u] += out;
      }
    }
  }

  // From ``dr``, the gradient of the node's raw state: ∂/∂c into ``dgate``, ∂/∂g into ``dg``,
  // the carried state's share added into ``dp``; ``sums`` += Σ ⟨d(W s), s⟩, then Σ ⟨dF, f_k(g)⟩
  // for tanh, σ, relu and identity.
  void backward(const T* gate, const T* g, const T* p, const T* dr, T* dgate, T* dg, T* dp,
                double* sums, int64_t d) const {
    T edge = T(0), dot_tanh = T(0), dot_sigmoid = T(0), dot_relu = T(0), dot_identity = T(0);
#pragma omp simd reduction(+ : edge, dot_tanh, dot_sigmoid, dot_relu, dot_identity)
    for (int64_t u = 0; u < d; ++u) {
      T th, sg;
      tanh_and_sigmoid(g[u], th, sg);
      const bool on = g[u] > T(0);
      const T relu = on ? g[u] : T(0);
      const T blend = blend_of(th, sg, relu, g[u], p[u]);
      const T c = gate[u];
      const T df = c * dr[u];
      const T dc = dr[u] - df;
      dgate[u] = blend * dr[u] * c * (T(1) - c);
      dp[u] += w_sum * dc;
      edge += dc * p[u];
      dg[u] = df * (w_tanh * (T(1) - th * th) + w_sigmoid * sg * (T(1) - sg) +
                    (on ? w_relu : T(0)) + w_identity);
      dot_tanh += df * th;
      dot_sigmoid += df * sg;
      dot_relu += df * relu;
      dot_identity += df * g[u];
    }
    sums[0] += edge;
    sums[1] += dot_tanh;
    sums[2] += dot_sigmoid;
    sums[3] += dot_relu;
    sums[4] += dot_identity;
  }
};

template <typename T>
class Forward {
 public:
  Forward(Cell& cell, const std::vector<Tensor>& act_w)
      : c_(cell), mix_(cell.nodes, act_w), bn_(cell.row_norm<T>()), pool_(cell.parts, 2 * cell.d) {}

  void run(const Tensor& x_proj, const Tensor& h0, const Tensor& w_h,
           const std::vector<Tensor>& weights, const std::vector<OptTensor>& gammas) {
    allocate(x_proj);
    c_.index();
    const Tensor hs = c_.saved[kHs], init = c_.saved[kInit];
    hs.select(0, 0).copy_(h0);
    in_parts(c_.parts, pool_, [&](int64_t p) {
      const int64_t rows = c_.rows(p);
      const Tensor mask = c_.rows_of(c_.mask, p);
      Tensor masked_h = mask.defined() ? at::empty({rows, c_.d}, x_proj.options()) : Tensor();
      for (int64_t t = 0; t < c_.steps; ++t) {
        Tensor h = c_.rows_of(hs.select(0, t), p);
        Tensor init_t = c_.rows_of(init.select(0, t), p);
        init_projection(init_t, c_.rows_of(x_proj.select(0, t), p), h, w_h, mask, masked_h);
        init_node(t, p, h.data_ptr<T>(), init_t.data_ptr<T>());
        for (int64_t i = 0; i < c_.n(); ++i) node(t, i, p, weights[i], gammas[i]);
        mean_of_states(t, c_.n(), p, c_.rows_of<T>(hs, t + 1, p));
      }
    });
  }

 private:
  Cell& c_;
  const Mixing<T> mix_;
  const RowNorm<T> bn_;
  PartPool pool_;  // the BatchNorm's column sums, across parts

  void allocate(const Tensor& x_proj) {
    const auto opt = x_proj.options();
    const int64_t T_ = c_.steps, N = c_.n(), B = c_.batch, d = c_.d;
    const bool stats = c_.norm.on && c_.norm.training;
    Tensor states = at::empty({T_, N + 1, B, d}, opt);  // rows in parts (``Cell``)
    Tensor mean = stats ? at::empty({T_, N + 1, d}, opt) : nothing(states);
    c_.saved = {states,
                c_.mask.defined() ? at::empty_like(states) : states,
                at::empty({T_ + 1, B, d}, opt),
                at::empty({T_, B, 2 * d}, opt),
                c_.norm.on ? at::empty_like(states) : nothing(states),
                mean,
                stats ? at::empty_like(mean) : nothing(states),
                c_.norm.on && !c_.norm.training ? c_.norm.scale : nothing(states),
                at::scalar_tensor(c_.parts, at::kLong)};
    for (const Node& node : c_.nodes) {
      const int64_t m = node.edges;
      c_.saved.push_back(at::empty({T_, m, B, 2 * d}, opt));  // rows in parts
      c_.saved.push_back(node.residual ? at::empty({T_, B, d}, opt) : nothing(states));
    }
  }

  // ``[c₀ | g₀]`` in ``z`` turned into ``[σ(c₀) | tanh(g₀)]``, then s₀ = BN(h + σ(c₀)(tanh(g₀) − h)).
  void init_node(int64_t t, int64_t p, const T* h, T* z) {
    const int64_t d = c_.d;
    T* s0 = c_.state_ptr<T>(kStates, t, 0, p);
    T* raw = c_.norm.on ? c_.state_ptr<T>(kPre, t, 0, p) : s0;
    over_rows(c_.rows(p), d, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* gate = z + b * 2 * d;
        T* value = gate + d;
        const T* hb = h + b * d;
        T* r = raw + b * d;
        highway_row(gate, value, hb, r, d, [](T v) { return tanh_value(v); });
      }
    });
    normalise(t, 0, p, s0);
    apply_mask(t, 0, p);
  }

  void node(int64_t t, int64_t i, int64_t p, const Tensor& weight, const OptTensor& gamma) {
    const Node& spec = c_.nodes[i];
    const int64_t R = c_.rows(p), d = c_.d, m = spec.edges, n_acts = spec.n_acts();
    Tensor z_t = c_.z_rows(t, i, p);
    at::mm_out(z_t, c_.inputs(t, i, p), weight);
    T* z = z_t.data_ptr<T>();
    T* state = c_.state_ptr<T>(kStates, t, i + 1, p);
    T* normed = spec.residual ? c_.rows_of<T>(c_.node_buffer(i, kNormed), t, p) : state;
    T* raw = c_.norm.on ? c_.state_ptr<T>(kPre, t, i + 1, p) : normed;
    const T* prev = c_.state_ptr<T>(kStates, t, spec.start, p);
    const std::vector<T>& mix = mix_.weights[i];
    const std::vector<T>& sums = mix_.edge_sums[i];
    // Edge by edge, each edge's rows in order: the passes then read and write a few long
    // streams, where row by row (all edges of a row, then the next row) they jumped between
    // ``m`` blocks of each buffer, more streams than the prefetcher follows, and waited on
    // memory (the backward a quarter of its time). The same sums in the same order.
    over_rows(R, d * m, [&](int64_t b0, int64_t b1) {
      std::vector<T> work((n_acts + 1) * d);  // f_k(g) rows, then F − W s
      T* bl = work.data() + n_acts * d;
      for (int64_t e = 0; e < m; ++e) {
        const T w_sum = sums[e];
        for (int64_t b = b0; b < b1; ++b) {
          T* r = raw + b * d;
          const int64_t row = e * R + b;
          T* gate = z + row * 2 * d;
          const T* p_row = prev + row * d;
          if (spec.standard) {
            const StandardEdge<T> edge(spec, mix.data() + e * n_acts, w_sum);
            if (e == 0) {
              edge.template forward<true>(gate, gate + d, p_row, r, d);
            } else {
              edge.template forward<false>(gate, gate + d, p_row, r, d);
            }
            continue;
          }
          for (int64_t u = 0; u < d; ++u) gate[u] = sigmoid(gate[u]);
          blend_row(spec, mix.data() + e * n_acts, w_sum, gate + d, p_row, work.data(), d);
          if (e == 0) {
            for (int64_t u = 0; u < d; ++u) r[u] = w_sum * p_row[u] + gate[u] * bl[u];
          } else {
            for (int64_t u = 0; u < d; ++u) r[u] += w_sum * p_row[u] + gate[u] * bl[u];
          }
        }
      }
    });
    normalise(t, i + 1, p, normed);
    if (spec.residual) {  // s = mean(s_1..s_{i−1}) + γ ⊙ y (0/0 for the first node, as eagerly)
      mean_of_states(t, i, p, state);
      const T* gm = gamma->data_ptr<T>();
      for (int64_t b = 0; b < R; ++b)
        for (int64_t u = 0; u < d; ++u) state[b * d + u] += gm[u] * normed[b * d + u];
    }
    apply_mask(t, i + 1, p);
  }

  // BatchNorm of state ``k`` at step ``t``, from its raw value in ``pre`` into ``out``.
  void normalise(int64_t t, int64_t k, int64_t p, T* out) {
    if (!c_.norm.on) return;
    const T* pre = c_.state_ptr<T>(kPre, t, k, p);
    T* mean = c_.stat_ptr<T>(kMean, t, k);
    T* invstd = c_.stat_ptr<T>(kInvstd, t, k);
    if (c_.parts == 1) {
      bn_.forward(pre, out, mean, invstd);
    } else {
      bn_.forward_part(pre, out, c_.rows(p), mean, invstd, pool_, p);
    }
  }

  void apply_mask(int64_t t, int64_t k, int64_t p) {
    if (!c_.mask.defined()) return;
    const T* state = c_.state_ptr<T>(kStates, t, k, p);
    const T* mask = c_.mask.data_ptr<T>() + c_.first_row(p) * c_.d;
    T* masked = c_.state_ptr<T>(kMasked, t, k, p);
    for (int64_t j = 0; j < c_.rows(p) * c_.d; ++j) masked[j] = state[j] * mask[j];
  }

  // ``out`` = mean of s_1..s_count in a part at step ``t``.
  void mean_of_states(int64_t t, int64_t count, int64_t p, T* out) {
    const auto node = [&](int64_t k) { return c_.state_ptr<T>(kStates, t, k, p); };
    output_rule(true, count, c_.rows(p) * c_.d, node, out);
  }
};

template <typename T>
class Backward {
 public:
  Backward(const Cell& cell, const std::vector<Tensor>& act_w)
      : c_(cell), mix_(cell.nodes, act_w), bn_(cell.row_norm<T>()), pool_(cell.parts, 2 * cell.d) {}

  // Gradients: x_proj, h0, w_h, then per node its weight, activation weights and γ (empty: none).
  std::vector<Tensor> run(const Tensor& grad_out, const Tensor& w_h,
                          const std::vector<Tensor>& weights, const std::vector<OptTensor>& gammas) {
    const int64_t T_ = c_.steps, N = c_.n(), B = c_.batch, d = c_.d;
    const auto opt = grad_out.options();
    Tensor d_init = at::empty({T_, B, 2 * d}, opt);
    Tensor carry = at::zeros({B, d}, opt);
    for (int64_t p = 0; p < c_.parts; ++p) parts_.emplace_back(c_, p, weights, opt);
    const T inv_n = T(1) / T(N);
    in_parts(c_.parts, pool_, [&](int64_t p) {
      const int64_t R = c_.rows(p);
      Part& part = parts_[p];
      Tensor carry_p = c_.rows_of(carry, p);
      for (int64_t t = T_ - 1; t >= 0; --t) {
        T* rows = part.d_states.template data_ptr<T>();
        const T* g = c_.rows_of<T>(grad_out, t, p);
        const T* cp = carry_p.data_ptr<T>();
        for (int64_t j = 0; j < R * d; ++j) rows[j] = T(0);
        for (int64_t j = 0; j < R * d; ++j) rows[R * d + j] = (g[j] + cp[j]) * inv_n;
        for (int64_t k = 2; k <= N; ++k) std::memcpy(rows + k * R * d, rows + R * d, R * d * sizeof(T));
        for (int64_t i = N - 1; i >= 0; --i) node(t, i, p, weights[i], gammas[i]);
        init_node(t, p, c_.rows_of(d_init.select(0, t), p), carry_p, w_h);
      }
    });
    Tensor h_in = c_.saved[kHs].narrow(0, 0, T_);
    if (c_.mask.defined()) h_in = h_in.mul(c_.mask);
    Tensor d_w_h = at::mm(h_in.reshape({T_ * B, d}).t(), d_init.view({T_ * B, 2 * d}));
    std::vector<Tensor> grads = {d_init, carry, d_w_h};
    for (int64_t i = 0; i < N; ++i) {  // the parts' sums, in part order
      Tensor dw = parts_[0].d_weights[i];
      for (int64_t p = 1; p < c_.parts; ++p) dw.add_(parts_[p].d_weights[i]);
      grads.push_back(dw);
    }
    for (int64_t i = 0; i < N; ++i) grads.push_back(activation_weight_grad(i, opt));
    for (int64_t i = 0; i < N; ++i) {
      Tensor dg = c_.nodes[i].residual ? at::zeros({d}, opt) : nothing(grad_out);
      for (const Part& part : parts_)
        for (int64_t u = 0; u < dg.numel(); ++u)
          dg.data_ptr<T>()[u] += static_cast<T>(part.d_gamma[i][u]);
      grads.push_back(dg);
    }
    return grads;
  }

 private:
  // What one part's thread keeps: its rows' gradients of a step's states, and its shares of
  // the sums over the batch (the weights', activation weights' and γ's gradients).
  struct Part {
    Tensor d_states, scratch, d_raw;  // d_raw: a state's gradient before its BatchNorm
    Tensor product;                   // the carried state's matmul before the dropout mask
    // With a dropout mask on h: per state, the sum of what the nodes' matmuls send back to its
    // masked copy, masked once when the state's last reader is done (``unmask``) rather than
    // once per reader, and zeroed there for the next step; undefined without a mask.
    Tensor d_masked;
    std::vector<Tensor> d_z;          // per node, (edges × rows, 2d), reused at every step
    std::vector<Tensor> d_weights;
    // Per node: Σ ⟨dF_j, f_k(g_j)⟩ (edges × acts), then Σ ⟨d(W_j s_j), s_j⟩ (edges), over steps.
    std::vector<std::vector<double>> reduced;
    std::vector<std::vector<double>> d_gamma;
    ChunkSums chunks;

    Part(const Cell& c, int64_t p, const std::vector<Tensor>& weights,
         const at::TensorOptions& opt) {
      const int64_t R = c.rows(p), d = c.d;
      d_states = at::empty({c.n() + 1, R, d}, opt);
      scratch = at::empty({R, d}, opt);
      d_raw = at::empty({R, d}, opt);
      product = at::empty({R, d}, opt);
      if (c.mask.defined()) d_masked = at::zeros({c.n() + 1, R, d}, opt);
      for (const Tensor& w : weights) d_weights.push_back(at::zeros_like(w));
      for (const Node& node : c.nodes) {
        reduced.emplace_back(node.edges * (node.n_acts() + 1), 0.0);
        d_z.push_back(at::empty({node.edges * R, 2 * d}, opt));
        d_gamma.emplace_back(node.residual ? d : 0, 0.0);
      }
    }
  };

  const Cell& c_;
  const Mixing<T> mix_;
  const RowNorm<T> bn_;
  PartPool pool_;  // the BatchNorm's column sums, across parts
  std::deque<Part> parts_;  // a deque: a Part (its ChunkSums' mutex) cannot move

  Tensor activation_weight_grad(int64_t i, const at::TensorOptions& options) {
    const Node& node = c_.nodes[i];
    const int64_t m = node.edges, n_acts = node.n_acts();
    std::vector<double> total(m * (n_acts + 1), 0.0);
    for (const Part& part : parts_)
      for (size_t j = 0; j < total.size(); ++j) total[j] += part.reduced[i][j];
    Tensor grad = at::empty({m, n_acts}, options);
    T* out = grad.data_ptr<T>();
    for (int64_t e = 0; e < m; ++e)
      for (int64_t k = 0; k < n_acts; ++k)
        out[e * n_acts + k] = static_cast<T>(total[e * n_acts + k] + total[m * n_acts + e]);
    return grad;
  }

  // State ``k``'s gradient before its BatchNorm in a part at step ``t``, from ``grad``, the one
  // after it.
  const T* norm_backward(int64_t t, int64_t k, int64_t p, const T* grad) {
    if (!c_.norm.on) return grad;
    T* d_raw = parts_[p].d_raw.template data_ptr<T>();
    const T* pre = c_.state_ptr<T>(kPre, t, k, p);
    const T* mean = c_.stat_ptr<T>(kMean, t, k);
    const T* invstd = c_.stat_ptr<T>(kInvstd, t, k);
    if (c_.parts == 1) {
      bn_.backward(grad, pre, mean, invstd, d_raw);
    } else {
      bn_.backward_part(grad, pre, c_.rows(p), mean, invstd, d_raw, pool_, p);
    }
    return d_raw;
  }

  void node(int64_t t, int64_t i, int64_t p, const Tensor& weight, const OptTensor& gamma) {
    const Node& spec = c_.nodes[i];
    const int64_t R = c_.rows(p), d = c_.d, m = spec.edges, n_acts = spec.n_acts();
    Part& part = parts_[p];
    T* rows = part.d_states.template data_ptr<T>();
    unmask(i + 1, p);
    Tensor d_state = part.d_states.select(0, i + 1);
    if (spec.residual) {
      const T* ds = d_state.data_ptr<T>();
      const T* normed = c_.rows_of<T>(c_.node_buffer(i, kNormed), t, p);
      const T* gm = gamma->data_ptr<T>();
      T* scaled = part.scratch.template data_ptr<T>();
      std::vector<T> dg(d, T(0));
      for (int64_t b = 0; b < R; ++b)
        for (int64_t u = 0; u < d; ++u) {
          dg[u] += ds[b * d + u] * normed[b * d + u];
          scaled[b * d + u] = ds[b * d + u] * gm[u];
        }
      for (int64_t u = 0; u < d; ++u) part.d_gamma[i][u] += dg[u];
      const auto row_of = [&](int64_t k) { return rows + k * R * d; };
      output_rule_backward(true, i, R * d, ds, row_of);  // the base: mean(s_1..s_{i−1})
      d_state = part.scratch;
    }
    const T* d_raw = norm_backward(t, i + 1, p, d_state.data_ptr<T>());
    const T* z = c_.z_ptr<T>(t, i, p);  // [σ(c) | g]
    Tensor dz = part.d_z[i];  // [∂/∂c | ∂/∂g]: not into z, so that a second backward reads it again
    T* dzp = dz.data_ptr<T>();
    const T* prev = c_.state_ptr<T>(kStates, t, spec.start, p);
    T* d_prev = rows + spec.start * R * d;
    const std::vector<T>& mix = mix_.weights[i];
    const std::vector<T>& sums = mix_.edge_sums[i];
    over_rows(R, d * m, [&](int64_t b0, int64_t b1) {  // edge by edge, as the forward
      std::vector<double> sums_here(m * (n_acts + 1), 0.0);
      std::vector<T> work((n_acts + 2) * d);  // f_k(g) rows, F − W s, then dF
      const T* bl = work.data() + n_acts * d;
      T* d_f = work.data() + (n_acts + 1) * d;
      for (int64_t e = 0; e < m; ++e) {
        const T w_sum = sums[e];
        for (int64_t b = b0; b < b1; ++b) {
          const T* dr = d_raw + b * d;
          const int64_t row = e * R + b;
          const T* gate = z + row * 2 * d;
          T* dgate = dzp + row * 2 * d;
          T* dg = dgate + d;
          const T* p_row = prev + row * d;
          T* dp = d_prev + row * d;
          if (spec.standard) {
            double edge_sums[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
            StandardEdge<T>(spec, mix.data() + e * n_acts, w_sum)
                .backward(gate, gate + d, p_row, dr, dgate, dg, dp, edge_sums, d);
            sums_here[m * n_acts + e] += edge_sums[0];
            for (int64_t act = 0; act < 4; ++act)
              sums_here[e * n_acts + spec.slots[act]] += edge_sums[1 + act];
            continue;
          }
          blend_row(spec, mix.data() + e * n_acts, w_sum, gate + d, p_row, work.data(), d);
          T edge = T(0);
#pragma omp simd reduction(+ : edge)
          for (int64_t u = 0; u < d; ++u) {
            const T c = gate[u];
            const T df = c * dr[u];
            const T dc = dr[u] - df;  // d(W s): the carried state's share
            d_f[u] = df;
            dgate[u] = bl[u] * dr[u] * c * (T(1) - c);
            dp[u] += w_sum * dc;
            edge += dc * p_row[u];
          }
          sums_here[m * n_acts + e] += edge;
          if (n_acts == 0) std::fill(dg, dg + d, T(0));  // a sampled ``none``: nothing reads g
          for (int64_t k = 0; k < n_acts; ++k) {
            const T* a = work.data() + k * d;
            const T w = mix[e * n_acts + k];
            T dot = T(0);
            if (k == 0) std::fill(dg, dg + d, T(0));
            with_activation(spec.acts[k], [&](auto act) {
#pragma omp simd reduction(+ : dot)
              for (int64_t u = 0; u < d; ++u) {
                dg[u] += w * d_f[u] * slope<act>(a[u]);
                dot += d_f[u] * a[u];
              }
            });
            sums_here[e * n_acts + k] += dot;
          }
        }
      }
      part.chunks.add(b0, std::move(sums_here));
    });
    part.chunks.merge_into(part.reduced[i]);
    part.d_weights[i].addmm_(c_.inputs(t, i, p).t(), dz);
    const Tensor& sent_to = part.d_masked.defined() ? part.d_masked : part.d_states;
    sent_to.narrow(0, spec.start, m).view({m * R, d}).addmm_(dz, weight.t());
  }

  // State ``k``'s gradient gets what its masked copy received, ⊙ the mask, and the copy's sum
  // is cleared for the step before. Called once a step per state, when the nodes that read
  // state ``k`` (every node from the ``k``-th on) are done: nothing more comes.
  void unmask(int64_t k, int64_t p) {
    Part& part = parts_[p];
    if (!part.d_masked.defined()) return;
    const int64_t n = c_.rows(p) * c_.d;
    const T* mask = c_.mask.template data_ptr<T>() + c_.first_row(p) * c_.d;
    T* sent = part.d_masked.template data_ptr<T>() + k * n;
    T* grad = part.d_states.template data_ptr<T>() + k * n;
    for (int64_t j = 0; j < n; ++j) {
      grad[j] += sent[j] * mask[j];
      sent[j] = T(0);
    }
  }

  void init_node(int64_t t, int64_t p, Tensor d_init_t, Tensor& carry, const Tensor& w_h) {
    const int64_t R = c_.rows(p), d = c_.d;
    unmask(0, p);
    const T* dr = norm_backward(t, 0, p, parts_[p].d_states.template data_ptr<T>());
    const T* z = c_.rows_of<T>(c_.saved[kInit], t, p);
    const T* h = c_.rows_of<T>(c_.saved[kHs], t, p);
    T* dz = d_init_t.data_ptr<T>();
    T* cp = carry.data_ptr<T>();
    for (int64_t b = 0; b < R; ++b)
      for (int64_t u = 0; u < d; ++u) {
        const int64_t j = b * d + u;
        const T c0 = z[b * 2 * d + u], g0 = z[b * 2 * d + d + u];
        const T d_g0 = dr[j] * c0;
        dz[b * 2 * d + d + u] = d_g0 * (T(1) - g0 * g0);
        dz[b * 2 * d + u] = dr[j] * (g0 - h[j]) * c0 * (T(1) - c0);
        cp[j] = dr[j] - d_g0;
      }
    add_masked_product<T>(carry, d_init_t, w_h.t(), c_.rows_of(c_.mask, p), parts_[p].product);
  }
};

struct Plan {
  std::vector<int64_t> starts, stops;
  std::vector<std::vector<int64_t>> acts;
  std::vector<bool> residual;
  bool batch_norm;
};

Cell make_cell(const Plan& plan, const Tensor& x_proj, const OptTensor& mask_h,
               const OptTensor& running_mean, const OptTensor& running_var, bool training,
               double momentum, double eps) {
  Cell cell;
  for (size_t i = 0; i < plan.starts.size(); ++i) {
    const int64_t start = plan.starts[i];
    cell.nodes.push_back({start, plan.stops[i] - start, plan.acts[i], plan.residual[i]});
  }
  cell.norm = {plan.batch_norm, training, running_mean, running_var, Tensor(), momentum, eps};
  if (mask_h.has_value()) cell.mask = mask_h->contiguous();
  cell.steps = x_proj.size(0);
  cell.batch = x_proj.size(1);
  cell.d = x_proj.size(2) / 2;
  return cell;
}


// Returns the output ``(T, B, d)``, then the buffers ``backward`` takes back (``Saved``).
std::vector<Tensor> forward(const Plan& plan, const Tensor& x_proj, const Tensor& h0,
                            const Tensor& w_h, const OptTensor& mask_h,
                            const std::vector<Tensor>& weights, const std::vector<Tensor>& act_w,
                            const std::vector<OptTensor>& gammas, const OptTensor& running_mean,
                            const OptTensor& running_var, bool training, double momentum,
                            double eps) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // our own buffers only
  const Tensor xp = x_proj.contiguous();
  Cell cell = make_cell(plan, xp, mask_h, running_mean, running_var, training, momentum, eps);
  if (cell.norm.on && !training) cell.norm.scale = at::rsqrt(running_var->add(eps));
  cell.parts = batch_parts(cell.batch);
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "darts_supernet_forward", [&] {
    Forward<scalar_t>(cell, contiguous(act_w))
        .run(xp, h0, w_h.contiguous(), contiguous(weights), contiguous(gammas));
  });
  std::vector<Tensor> result = {cell.saved[kHs].narrow(0, 1, cell.steps).clone()};
  result.insert(result.end(), cell.saved.begin(), cell.saved.end());
  return result;
}

std::vector<Tensor> backward(const Plan& plan, const Tensor& grad_out,
                             const std::vector<Tensor>& saved, const Tensor& w_h,
                             const OptTensor& mask_h, const std::vector<Tensor>& weights,
                             const std::vector<Tensor>& act_w, const std::vector<OptTensor>& gammas,
                             const OptTensor& running_mean, const OptTensor& running_var,
                             bool training, double eps) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // our own buffers only
  const Tensor grad = grad_out.contiguous();
  Cell cell = make_cell(plan, saved[kInit], mask_h, running_mean, running_var, training, 0.0, eps);
  cell.saved = saved;
  cell.index();
  if (cell.norm.on && !training) cell.norm.scale = saved[kScale];
  cell.parts = saved[kParts].item<int64_t>();
  std::vector<Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "darts_supernet_backward", [&] {
    grads = Backward<scalar_t>(cell, contiguous(act_w))
                .run(grad, w_h.contiguous(), contiguous(weights), contiguous(gammas));
  });
  return grads;
}

inline void bind(pybind11::module_ m) {
  pybind11::class_<Plan>(m, "Plan")
      .def(pybind11::init<std::vector<int64_t>, std::vector<int64_t>,
                          std::vector<std::vector<int64_t>>, std::vector<bool>, bool>());
  m.def("forward", &forward);
  m.def("backward", &backward);
}

}  // namespace morphnas_native::darts_supernet
