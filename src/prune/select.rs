//! The pure core of pruning: which filters go, in what order, for each selector and fraction.
//!
//! In: candidate filters (layer, channel) in forward order, with the value each selector ranks
//! by. Out: for a fraction, the filters to prune (global: one ranking across layers; per layer:
//! the same fraction of each layer, rounded per layer).

use serde::{Deserialize, Serialize};

/// How filters are ranked for removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selector {
    /// Highest score first (the method's claim: these matter most).
    ScoreHigh,
    /// Lowest score first; a neuron without a score (no response at all) counts as lowest.
    ScoreLow,
    /// Uniformly random, seeded.
    Random,
    /// Smallest L1 norm of the filter's weights first (Li et al. 2017).
    L1Norm,
    /// Smallest |batch-norm scale| first (network slimming, Liu et al. 2017).
    BnScale,
}

impl Selector {
    /// Every selector, in the order results are reported.
    pub const ALL: [Selector; 5] = [
        Selector::ScoreHigh,
        Selector::ScoreLow,
        Selector::Random,
        Selector::L1Norm,
        Selector::BnScale,
    ];

    /// The name used in pipelines and outputs.
    pub fn name(self) -> &'static str {
        match self {
            Selector::ScoreHigh => "score-high",
            Selector::ScoreLow => "score-low",
            Selector::Random => "random",
            Selector::L1Norm => "l1-norm",
            Selector::BnScale => "bn-scale",
        }
    }
}

/// One ranking for all filters at once, or the same fraction in every layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// One ranking across layers.
    #[default]
    Global,
    /// Each layer loses the same fraction of its filters.
    Layer,
}

/// A filter that may be pruned.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Index of its layer among the candidate layers (forward order).
    pub layer: usize,
    /// Output channel.
    pub channel: usize,
}

/// The order in which filters are removed: indices into `values`. `values[i]` is the ranking
/// value of candidate `i` (`None`: no value, sorted as the lowest). `descending` removes the
/// highest first. Ties keep forward order, so the result is deterministic.
pub fn order_by(values: &[Option<f64>], descending: bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let key = |i: usize| {
        values[i]
            .filter(|v| !v.is_nan())
            .unwrap_or(f64::NEG_INFINITY)
    };
    idx.sort_by(|&a, &b| {
        let o = key(a).total_cmp(&key(b));
        if descending {
            o.reverse()
        } else {
            o
        }
    });
    idx
}

/// A random order of `n` candidates from `seed` (Fisher-Yates over SplitMix64).
pub fn random_order(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed ^ 0x5851_f42d_4c95_7f2d;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx
}

/// The filters to prune at `fraction`, following `order`: globally the first
/// `round(fraction * n)`; per layer the first `round(fraction * layer size)` of each layer in
/// that order. Returned in removal order.
pub fn take(cands: &[Candidate], order: &[usize], fraction: f64, scope: Scope) -> Vec<usize> {
    match scope {
        Scope::Global => {
            let n = (fraction * cands.len() as f64).round() as usize;
            order[..n.min(order.len())].to_vec()
        }
        Scope::Layer => {
            let layers = cands.iter().map(|c| c.layer + 1).max().unwrap_or(0);
            let mut size = vec![0usize; layers];
            for c in cands {
                size[c.layer] += 1;
            }
            let quota: Vec<usize> = size
                .iter()
                .map(|s| (fraction * *s as f64).round() as usize)
                .collect();
            let mut taken = vec![0usize; layers];
            order
                .iter()
                .copied()
                .filter(|&i| {
                    let l = cands[i].layer;
                    let keep = taken[l] < quota[l];
                    taken[l] += keep as usize;
                    keep
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(sizes: &[usize]) -> Vec<Candidate> {
        sizes
            .iter()
            .enumerate()
            .flat_map(|(l, s)| {
                (0..*s).map(move |c| Candidate {
                    layer: l,
                    channel: c,
                })
            })
            .collect()
    }

    #[test]
    fn ordering_puts_missing_values_lowest_and_keeps_ties_in_order() {
        let v = [Some(1.0), None, Some(3.0), Some(1.0), Some(f64::NAN)];
        assert_eq!(order_by(&v, true), vec![2, 0, 3, 1, 4]);
        assert_eq!(order_by(&v, false), vec![1, 4, 0, 3, 2]);
    }

    #[test]
    fn random_orders_are_permutations_that_depend_on_the_seed() {
        let a = random_order(100, 1);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(a, random_order(100, 1));
        assert_ne!(a, random_order(100, 2));
    }

    #[test]
    fn global_and_per_layer_fractions() {
        let c = cands(&[4, 16]);
        // order: everything in layer 1 first, then layer 0
        let order: Vec<usize> = (4..20).chain(0..4).collect();
        let g = take(&c, &order, 0.25, Scope::Global);
        assert_eq!(g.len(), 5);
        assert!(g.iter().all(|&i| c[i].layer == 1));
        let l = take(&c, &order, 0.25, Scope::Layer);
        assert_eq!(l.iter().filter(|&&i| c[i].layer == 0).count(), 1);
        assert_eq!(l.iter().filter(|&&i| c[i].layer == 1).count(), 4);
        assert!(take(&c, &order, 0.0, Scope::Layer).is_empty());
        assert_eq!(take(&c, &order, 1.0, Scope::Global).len(), 20);
    }
}
