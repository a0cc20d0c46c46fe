//! Building a VIP's ring of backend slots from weights (userspace only).

use alloc::vec::Vec;

use crate::backend::RING_SIZE;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// Every weight is zero.
    Empty,
    /// More backends with nonzero weight than ring slots.
    TooManyBackends(usize),
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Builds the ring for `(backend index, weight)` pairs: each backend appears in proportion
/// to its weight, interleaved by smooth weighted round-robin (nginx's algorithm) so that
/// heavy backends do not take runs of consecutive new flows. Weights are divided by their
/// gcd; if the sum still exceeds [`RING_SIZE`] they are scaled down proportionally (a
/// nonzero weight never drops below one slot). Backends with weight 0 get no slot.
pub fn build(weights: &[(u32, u32)]) -> Result<Vec<u32>, RingError> {
    let live: Vec<(u32, u32)> = weights.iter().copied().filter(|&(_, w)| w > 0).collect();
    if live.len() > RING_SIZE as usize {
        return Err(RingError::TooManyBackends(live.len()));
    }
    let g = live.iter().fold(0, |g, &(_, w)| gcd(g, w));
    if g == 0 {
        return Err(RingError::Empty);
    }
    let mut live: Vec<(u32, u64)> = live.iter().map(|&(b, w)| (b, u64::from(w / g))).collect();
    let mut total: u64 = live.iter().map(|&(_, w)| w).sum();
    if total > u64::from(RING_SIZE) {
        // Scale into the ring; rounding down, with a floor of one slot.
        let budget = u64::from(RING_SIZE);
        for (_, w) in live.iter_mut() {
            *w = (*w * budget / total).max(1);
        }
        total = live.iter().map(|&(_, w)| w).sum();
        // Floors may overshoot when there are many tiny weights: trim the largest.
        while total > budget {
            let max = live.iter_mut().max_by_key(|(_, w)| *w).expect("non-empty");
            max.1 -= 1;
            total -= 1;
        }
    }
    let mut current: Vec<i64> = alloc::vec![0; live.len()];
    let mut ring = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..live.len() {
            current[i] += live[i].1 as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        ring.push(live[best].0);
    }
    Ok(ring)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(weights: &[(u32, u32)], expected: &[u32]) {
        assert_eq!(build(weights).unwrap(), expected, "{weights:?}");
    }

    #[test]
    fn rings() {
        check(&[(0, 1)], &[0]);
        check(&[(0, 1), (1, 1)], &[0, 1]);
        check(&[(7, 100), (9, 100), (3, 100)], &[7, 9, 3]);
        check(&[(0, 2), (1, 1)], &[0, 1, 0]);
        check(&[(0, 5), (1, 1), (2, 1)], &[0, 0, 1, 0, 2, 0, 0]);
        check(&[(0, 4), (1, 0), (2, 2)], &[0, 2, 0]);
    }

    #[test]
    fn empty() {
        assert_eq!(build(&[]), Err(RingError::Empty));
        assert_eq!(build(&[(0, 0), (1, 0)]), Err(RingError::Empty));
    }

    #[test]
    fn large_weights_fit_and_keep_proportions() {
        let ring = build(&[(0, 256), (1, 255), (2, 1)]).unwrap();
        assert!(ring.len() <= RING_SIZE as usize);
        let count = |b| ring.iter().filter(|&&x| x == b).count();
        assert!(count(2) >= 1);
        assert!(count(0).abs_diff(count(1)) <= 2, "{} {}", count(0), count(1));
        let many: Vec<(u32, u32)> = (0..500).map(|b| (b, 1 + b % 3)).collect();
        let ring = build(&many).unwrap();
        assert!(ring.len() <= RING_SIZE as usize);
        for b in 0..500 {
            assert!(ring.contains(&b), "backend {b} lost its slot");
        }
        let too_many: Vec<(u32, u32)> = (0..600).map(|b| (b, 1)).collect();
        assert_eq!(build(&too_many), Err(RingError::TooManyBackends(600)));
    }
}
