// Exact transportation solver for general weights / N != M: successive shortest paths (primal-dual) on the
// bipartite network, with Dijkstra on reduced costs and node potentials. Host-only (dense O(N M) flow storage,
// O((N + M) N M) worst-case time): used by the CPU op, and by the CUDA op on a CPU copy.
//
// Potentials pi keep every residual arc's reduced cost non-negative: forward i->j: c_ij + pi_i - pi_j >= 0,
// reverse j->i (when flow_ij > 0): equality. Hence f_i = -pi_i, g_j = pi_j are dual feasible and tight on the
// plan's support, which is the optimality certificate; they are the returned dual potentials.
// After the flow is found, zero-cost cycles in its support are cancelled so the plan is a forest (at most
// N + M - 1 non-zeros, a vertex of the transport polytope).
#pragma once
#include <algorithm>
#include <numeric>
#include <vector>

#include "emd/auction.h"

namespace flashavatar {
namespace ot {

struct SspResult {
  double cost = 0.0;  // sum flow * c (float64)
  double gap = 0.0;   // primal - dual
  int status = kRunning;
  long long iterations = 0;
};

template <typename scalar_t>
class SspSolver {
 public:
  SspSolver(const scalar_t* x, const scalar_t* y, int n, int m, int d, int p)
      : x_(x), y_(y), n_(n), m_(m), d_(d), p_(p) {}

  double cost(int i, int j) const {
    return static_cast<double>(ground_cost<0, scalar_t>(x_ + static_cast<long>(i) * d_, y_ + static_cast<long>(j) * d_, d_, p_));
  }

  // a [n], b [m] >= 0 with equal sums. flow [n*m] row-major out; f [n], g [m] out.
  SspResult solve(const double* a, const double* b, long long max_iter, std::vector<double>& flow, double* f,
                  double* g) {
    SspResult res;
    const int n = n_, m = m_;
    const double total = std::accumulate(a, a + n, 0.0);
    const double mass_eps = 1e-14 * (total > 0 ? total : 1.0);
    flow.assign(static_cast<size_t>(n) * m, 0.0);
    std::vector<double> excess(a, a + n), deficit(b, b + m), pi_s(n, 0.0), pi_t(m, 0.0);
    for (double& v : excess) v = v > mass_eps ? v : 0.0;
    for (double& v : deficit) v = v > mass_eps ? v : 0.0;
    std::vector<double> dist_s(n), dist_t(m);
    std::vector<int> parent_s(n), parent_t(m);
    std::vector<char> done_s(n), done_t(m);
    // Sources in the order they settle, to update potentials only where Dijkstra went.
    std::vector<int> settled_s, settled_t;
    settled_s.reserve(n);
    settled_t.reserve(m);
    res.status = kConverged;
    while (true) {
      double remaining = 0.0;
      for (double v : excess) remaining += v;
      if (remaining <= mass_eps * 16) break;
      if (res.iterations >= max_iter) {
        res.status = kMaxIter;
        break;
      }
      ++res.iterations;
      // ---- Dijkstra from every source with excess, on reduced costs ----
      std::fill(dist_s.begin(), dist_s.end(), kInf);
      std::fill(dist_t.begin(), dist_t.end(), kInf);
      std::fill(parent_s.begin(), parent_s.end(), -1);
      std::fill(parent_t.begin(), parent_t.end(), -1);
      std::fill(done_s.begin(), done_s.end(), 0);
      std::fill(done_t.begin(), done_t.end(), 0);
      settled_s.clear();
      settled_t.clear();
      for (int i = 0; i < n; ++i)
        if (excess[i] > 0.0) dist_s[i] = 0.0;
      int target = -1;
      double dist_target = 0.0;
      while (true) {
        int best = -1;
        bool best_is_sink = false;
        double best_d = kInf;
        for (int i = 0; i < n; ++i)
          if (!done_s[i] && dist_s[i] < best_d) best_d = dist_s[i], best = i, best_is_sink = false;
        for (int j = 0; j < m; ++j)
          if (!done_t[j] && dist_t[j] < best_d) best_d = dist_t[j], best = j, best_is_sink = true;
        if (best < 0) break;  // nothing reachable: only rounding dust is left
        if (best_is_sink) {
          const int j = best;
          done_t[j] = 1;
          settled_t.push_back(j);
          if (deficit[j] > 0.0) {
            target = j;
            dist_target = best_d;
            break;
          }
          for (int i = 0; i < n; ++i) {  // reverse arcs j -> i where flow > 0 (reduced cost 0 up to rounding)
            if (done_s[i] || flow[static_cast<size_t>(i) * m + j] <= 0.0) continue;
            const double rc = -(cost(i, j) + pi_s[i] - pi_t[j]);
            const double nd = best_d + (rc > 0.0 ? rc : 0.0);
            if (nd < dist_s[i]) dist_s[i] = nd, parent_s[i] = j;
          }
        } else {
          const int i = best;
          done_s[i] = 1;
          settled_s.push_back(i);
          for (int j = 0; j < m; ++j) {  // forward arcs i -> j (uncapacitated)
            if (done_t[j]) continue;
            const double rc = cost(i, j) + pi_s[i] - pi_t[j];
            const double nd = best_d + (rc > 0.0 ? rc : 0.0);
            if (nd < dist_t[j]) dist_t[j] = nd, parent_t[j] = i;
          }
        }
      }
      if (target < 0) break;
      // ---- potentials: pi += dist - D on settled nodes keeps all reduced costs >= 0 ----
      for (int i : settled_s) pi_s[i] += dist_s[i] - dist_target;
      for (int j : settled_t) pi_t[j] += dist_t[j] - dist_target;
      // ---- augment along the path target <- ... <- root ----
      double delta = deficit[target];
      int j = target, root = -1;
      while (true) {
        const int i = parent_t[j];
        if (parent_s[i] < 0) {
          root = i;
          break;
        }
        j = parent_s[i];
        delta = std::min(delta, flow[static_cast<size_t>(i) * m + j]);
      }
      delta = std::min(delta, excess[root]);
      j = target;
      while (true) {
        const int i = parent_t[j];
        flow[static_cast<size_t>(i) * m + j] += delta;
        if (parent_s[i] < 0) break;
        j = parent_s[i];
        double& back = flow[static_cast<size_t>(i) * m + j];
        back -= delta;
        if (back <= mass_eps * 1e-3) back = 0.0;
      }
      excess[root] -= delta;
      if (excess[root] <= mass_eps) excess[root] = 0.0;
      deficit[target] -= delta;
      if (deficit[target] <= mass_eps) deficit[target] = 0.0;
    }
    cancel_cycles(flow);
    // Duals and certificate.
    double primal = 0.0, dual = 0.0;
    for (int i = 0; i < n; ++i) {
      f[i] = -pi_s[i];
      dual += a[i] * f[i];
      for (int jj = 0; jj < m; ++jj) {
        const double fl = flow[static_cast<size_t>(i) * m + jj];
        if (fl > 0.0) primal += fl * cost(i, jj);
      }
    }
    for (int jj = 0; jj < m; ++jj) {
      g[jj] = pi_t[jj];
      dual += b[jj] * g[jj];
    }
    res.cost = primal;
    res.gap = primal > dual ? primal - dual : 0.0;
    return res;
  }

 private:
  // Turns the support of `flow` into a forest by pushing flow around its cycles (alternating +/- keeps the
  // marginals); the direction that does not increase the cost is taken (on an optimal plan both are free).
  void cancel_cycles(std::vector<double>& flow) const {
    const int n = n_, m = m_, nodes = n + m;
    std::vector<int> uf(nodes);
    std::iota(uf.begin(), uf.end(), 0);
    auto find = [&](int v) {
      while (uf[v] != v) v = uf[v] = uf[uf[v]];
      return v;
    };
    // forest adjacency: node -> list of (neighbour); edges identified by (i, j) so flow decides liveness
    std::vector<std::vector<int>> adj(nodes);
    std::vector<int> prev(nodes), queue;
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < m; ++j) {
        if (flow[static_cast<size_t>(i) * m + j] <= 0.0) continue;
        const int u = i, v = n + j;
        const int ru = find(u), rv = find(v);
        if (ru != rv) {
          uf[ru] = rv;
          adj[u].push_back(v);
          adj[v].push_back(u);
          continue;
        }
        // Path v -> u in the forest (BFS over live edges), then the cycle u -(new edge)- v ... u.
        std::fill(prev.begin(), prev.end(), -1);
        queue.assign(1, v);
        prev[v] = v;
        for (size_t q = 0; q < queue.size() && prev[u] < 0; ++q) {
          const int w = queue[q];
          for (int z : adj[w])
            if (prev[z] < 0 && edge_flow(flow, w, z) > 0.0) prev[z] = w, queue.push_back(z);
        }
        if (prev[u] < 0) {  // cannot happen (cancelling keeps connectivity); keep the edge rather than loop
          adj[u].push_back(v);
          adj[v].push_back(u);
          continue;
        }
        std::vector<int> path;  // u, ..., v
        for (int w = u; w != v; w = prev[w]) path.push_back(w);
        path.push_back(v);
        // Cycle edges: (path[k], path[k+1]) for k = 0.., then (v, u) = the new edge. Alternate signs.
        const int len = static_cast<int>(path.size());  // even number of nodes: len - 1 path edges is odd
        double cost_plus = 0.0, cost_minus = 0.0, min_plus = kInf, min_minus = kInf;
        for (int k = 0; k < len; ++k) {
          const int s = path[k], t = (k + 1 < len) ? path[k + 1] : path[0];
          const double c = edge_cost(s, t), fl = edge_flow(flow, s, t);
          if (k % 2 == 0) cost_plus += c, min_plus = std::min(min_plus, fl);
          else cost_minus += c, min_minus = std::min(min_minus, fl);
        }
        const bool decrease_even = cost_plus >= cost_minus;  // push -theta on the even edges
        const double theta = decrease_even ? min_plus : min_minus;
        for (int k = 0; k < len; ++k) {
          const int s = path[k], t = (k + 1 < len) ? path[k + 1] : path[0];
          double& fl = edge_flow(flow, s, t);
          const bool even = (k % 2 == 0);
          fl += (even == decrease_even) ? -theta : theta;
          if (fl <= 0.0) fl = 0.0;
        }
        // One cycle edge hit zero; if the new edge survived, keep it in the forest (connectivity unchanged).
        if (flow[static_cast<size_t>(i) * m + j] > 0.0) {
          // remove the zeroed forest edges lazily (edge_flow = 0 hides them), add the new edge
          adj[u].push_back(v);
          adj[v].push_back(u);
        }
      }
    }
  }

  double& edge_flow(std::vector<double>& flow, int s, int t) const {
    const int i = s < n_ ? s : t, j = (s < n_ ? t : s) - n_;
    return flow[static_cast<size_t>(i) * m_ + j];
  }
  double edge_cost(int s, int t) const {
    const int i = s < n_ ? s : t, j = (s < n_ ? t : s) - n_;
    return cost(i, j);
  }

  const scalar_t* x_;
  const scalar_t* y_;
  int n_, m_, d_, p_;
};

}  // namespace ot
}  // namespace flashavatar
