//! The SYN flood guard. A flood of SYNs from forged sources would fill the flow table with
//! entries no packet ever uses again, and every new entry replaces the one of its set seen
//! longest ago: the entries of real, idle flows go first, and their next packets are placed
//! by the hash, which is not where round robin put them (the backend answers with a reset).
//! So each CPU counts the SYNs it pins per VIP; when `limit` of them came within about a
//! second, the next ones are placed by their 5-tuple's hash and get no entry, until a
//! second has passed since the count began. Its flow loses nothing: its
//! later packets find no entry either and take the same hash (the hash fallback, which
//! makes the entry then), so only SYNs that no ACK follows stay out of the table. Katran
//! does the same above 125,000 new connections a second per CPU (`MAX_CONN_RATE`: its LRU
//! writes stop and placement is by its consistent hash alone).
//!
//! UDP is not guarded: any datagram without an entry may open a flow, and nothing tells the
//! later ones apart, so a flow placed by hash during a flood would move to its round-robin
//! backend once the flood ended.

//!
//! The same count, kept per source address in an LRU hash map shared by the CPUs, limits
//! how many new flows one client may open a window (HAProxy's `sc_conn_rate` with a
//! `tcp-request connection reject`): past it, its SYNs and first datagrams are dropped, so a
//! single source cannot take the flow table or the backends' accept queues; its flows
//! already open go on. The CPUs update a source's count without a lock: two of them can
//! count one SYN once between them, so the limit holds to within the CPUs a source's
//! packets arrive on.

/// Sources whose new flows the per-source limit counts at once (the LRU map's size): the
/// least recently seen is forgotten first, and starts a new count when it comes back.
pub const SOURCE_TABLE_SIZE: u32 = 65_536;

/// A window is 2^30 ns (1.07 s), counted in units of 2^20 ns (1.05 ms).
pub const UNIT_SHIFT: u32 = 20;
pub const WINDOW_UNITS: u32 = 1 << (30 - UNIT_SHIFT);
/// New TCP flows a CPU pins to one VIP per window unless configured otherwise: Katran's
/// `MAX_CONN_RATE` (125,000 a second per CPU).
pub const DEFAULT_FLOOD_LIMIT: u32 = 125_000;

/// `LbConfig::flood_limit` of a balancer that withdraws from the routers (shutting down
/// behind ECMP): every new flow is placed by the 5-tuple hash without an entry, as the
/// other balancers place a flow's packets that they have no entry for. A flow that starts
/// here while the routers move away then lands on one backend whichever balancer its later
/// packets reach, before the flow sync could tell them of it.
pub const HASH_NEW_FLOWS: u32 = u32::MAX;

/// One more SYN with the guard in `state` (when the count began, in units of the clock,
/// above; the count below): the new state, and whether the SYN is within `limit` (it gets
/// an entry). `clock` (monotonic ns) is read only for the first SYN and when the count
/// reaches the limit: once per `limit` SYNs unless there is a flood. Past the limit, a SYN
/// is within it again once a window has passed since the count began (a new count starts
/// with it), so at most `limit` SYNs a window get entries, flood or not, and the guard
/// costs the SYNs below the limit one increment.
#[inline(always)]
pub fn admit(state: u64, limit: u32, clock: impl FnOnce() -> u64) -> (u64, bool) {
    let count = state as u32;
    if count != 0 && count < limit {
        return (state + 1, true);
    }
    let now = (clock() >> UNIT_SHIFT) as u32;
    if count == 0 || now.wrapping_sub((state >> 32) as u32) >= WINDOW_UNITS {
        return (u64::from(now) << 32 | 1, true);
    }
    (state, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn limit_per_window() {
        let unit = 1u64 << UNIT_SHIFT;
        let window = u64::from(WINDOW_UNITS) * unit;
        let t0 = 1000 * unit;
        let mut state = 0;
        let mut admitted = Vec::new();
        let mut reads = 0;
        // A limit of 3: SYNs at t0 (x5), half a window later (x2), then one window after
        // the count began, then 3 more.
        for now in [t0, t0, t0, t0, t0, t0 + window / 2, t0 + window / 2, t0 + window, t0 + window, t0 + window, t0 + window] {
            let (next, ok) = admit(state, 3, || {
                reads += 1;
                now
            });
            state = next;
            admitted.push(ok);
        }
        assert_eq!(admitted, [true, true, true, false, false, false, false, true, true, true, false]);
        // The clock: the first SYN, each one at the limit (the 4th to 8th and the 11th).
        assert_eq!(reads, 7);
        // The clock's units wrap (32 bits of 1.05 ms: every 52 days) without harm.
        let late = u64::from(u32::MAX) * unit;
        let (s, _) = admit(0, 1, || late);
        assert_eq!(admit(s, 1, || late + unit), (s, false));
        assert!(admit(s, 1, || late + window).1);
    }
}
