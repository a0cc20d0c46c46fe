//! The SYN flood guard. A flood of SYNs from forged sources would fill the flow table with
//! entries no packet ever uses again, and every new entry replaces the one of its set seen
//! longest ago: the entries of real, idle flows go first, and their next packets are placed
//! by the hash, which is not where round robin put them (the backend answers with a reset).
//! So each CPU counts the SYNs it pins per VIP in a window of about a second; past the limit,
//! a SYN is placed by its 5-tuple's hash and gets no entry. Its flow loses nothing: its
//! later packets find no entry either and take the same hash (the hash fallback, which
//! makes the entry then), so only SYNs that no ACK follows stay out of the table. Katran
//! does the same above 125,000 new connections a second per CPU (`MAX_CONN_RATE`: its LRU
//! writes stop and placement is by its consistent hash alone).
//!
//! UDP is not guarded: any datagram without an entry may open a flow, and nothing tells the
//! later ones apart, so a flow placed by hash during a flood would move to its round-robin
//! backend once the flood ended.

/// A window is 2^30 ns (1.07 s) of the coarse monotonic clock.
pub const WINDOW_SHIFT: u32 = 30;
/// New TCP flows a CPU pins to one VIP per window unless configured otherwise: Katran's
/// `MAX_CONN_RATE` (125,000 a second per CPU).
pub const DEFAULT_FLOOD_LIMIT: u32 = 125_000;

/// One more SYN at `now_ns` with the guard in `state` (the window's number above, the count
/// below): the new state, and whether the SYN is within `limit` (it gets an entry).
#[inline(always)]
pub fn admit(state: u64, now_ns: u64, limit: u32) -> (u64, bool) {
    let window = (now_ns >> WINDOW_SHIFT) as u32;
    let count = if (state >> 32) as u32 == window { (state as u32).saturating_add(1) } else { 1 };
    (u64::from(window) << 32 | u64::from(count), count <= limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn counts_per_window() {
        let second = 1u64 << WINDOW_SHIFT;
        let mut state = 0;
        let mut admitted = Vec::new();
        // Five SYNs in one window with a limit of 3, then one in the next window.
        for now in [5 * second, 5 * second + 1, 5 * second + 7, 6 * second - 1, 6 * second - 1, 6 * second] {
            let (next, ok) = admit(state, now, 3);
            state = next;
            admitted.push(ok);
        }
        assert_eq!(admitted, [true, true, true, false, false, true]);
        assert_eq!(state, 6 << 32 | 1);
        // A state from long ago (or never set) starts a new count.
        assert_eq!(admit(0, 9 * second, 1), (9 << 32 | 1, true));
        // The count saturates instead of wrapping to "within the limit".
        assert_eq!(admit(u64::from(u32::MAX), 0, u32::MAX - 1), (u64::from(u32::MAX), false));
    }
}
