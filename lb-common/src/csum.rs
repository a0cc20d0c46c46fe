//! Internet checksum (RFC 1071) helpers.

/// Folds a 32-bit one's-complement sum into 16 bits and complements it.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The one's-complement sum of a word's two 16-bit halves as they lie in memory (the sum
/// does not depend on byte order, RFC 1071 §2(B)); add these up, then [`fold`].
#[inline(always)]
pub const fn halves(w: u32) -> u32 {
    (w & 0xffff) + (w >> 16)
}

/// RFC 1071 over bytes, an odd last byte padded with zero (host side: fixtures and tests).
pub fn bytes(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    fold(sum)
}

/// The checksum `check` after one 16-bit field it covers changed from `old` to `new`
/// (RFC 1624, eqn. 3). Any byte order, as long as all three are read the same way.
#[inline(always)]
pub fn replace(check: u16, old: u16, new: u16) -> u16 {
    fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// Checksum of a 20-byte IPv4 header (without options). The checksum field itself
/// (bytes 10..12) is included as it is: zero it first to compute, keep it to verify
/// (a correct header then sums to 0).
#[inline(always)]
pub fn ipv4_header(hdr: &[u8; 20]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        i += 2;
    }
    fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(hdr: [u8; 20], expected: u16) {
        let mut zeroed = hdr;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(ipv4_header(&zeroed), expected, "compute");
        let mut filled = zeroed;
        filled[10..12].copy_from_slice(&expected.to_be_bytes());
        assert_eq!(ipv4_header(&filled), 0, "verify");
    }

    #[test]
    fn known_headers() {
        // Wikipedia's example header: checksum 0xb861.
        check(
            [0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7],
            0xb861,
        );
        // A header whose sum needs two folds.
        check([0xff; 20], 0x0000);
        check([0x45, 0, 0, 0x28, 0, 0, 0x40, 0, 0x40, 0x04, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2], 0x26d0);
    }

    #[test]
    fn replace_matches_a_full_computation() {
        let mut h = [0x45, 0, 0, 0x54, 0x12, 0x34, 0x40, 0, 0x3f, 1, 0, 0, 192, 168, 7, 10, 10, 100, 0, 1];
        for (ttl, new_ttl) in [(0x3f, 64), (1, 255), (255, 0), (64, 64)] {
            h[8] = ttl;
            h[10..12].fill(0);
            let c = ipv4_header(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            let proto = h[9];
            let field = |t: u8| u16::from_be_bytes([t, proto]);
            let got = replace(c, field(ttl), field(new_ttl));
            h[8] = new_ttl;
            h[10..12].fill(0);
            assert_eq!(got, ipv4_header(&h), "TTL {ttl} -> {new_ttl}");
            // Read natively instead: the same bytes.
            let ne = |x: u16| u16::from_ne_bytes(x.to_be_bytes());
            assert_eq!(replace(ne(c), ne(field(ttl)), ne(field(new_ttl))), ne(got));
        }
    }

    #[test]
    fn fold_carries() {
        assert_eq!(fold(0), 0xffff);
        assert_eq!(fold(0xffff), 0);
        assert_eq!(fold(0x1_fffe), 0);
        assert_eq!(fold(0x2_0000), !2);
    }
}
