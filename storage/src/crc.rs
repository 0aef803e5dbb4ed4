//! CRC32C of a concatenation from the CRC32Cs of its parts: `combine(crc(A), crc(B), len(B))
//! = crc(A ‖ B)`, without reading A or B again.
//!
//! The stored CRC32C of an object is kept this way across large frame payloads (their CRC
//! is already in the frame header), and a restored file's CRC32C across its pieces. Why not
//! the `crc32c` crate's `crc32c_combine`: it builds and squares 32×32 GF(2) matrices for
//! every bit of the length (zlib's method before 1.2.12), about 18 µs a call on this
//! project's machines (`cargo run --release -p storage --example codec_costs`), which made
//! combining a compressed 70 KB payload slower than reading it. This is the method of zlib 1.2.12+ (`crc32_combine_gen`, `multmodp`, `x2nmodp` in
//! zlib's `crc32.c`; the math in Mark Adler's notes there): appending `n` bytes to A is
//! multiplying its CRC by x^(8n) modulo the polynomial, and x^(8n) is the product of the
//! precomputed x^(2^k) for the bits of `8n`: 0.2 µs a call.
//!
//! Polynomials are in the reflected representation CRC32C uses: bit 31 is x^0.

/// CRC-32C (Castagnoli), reflected.
const POLY: u32 = 0x82F6_3B78;

/// `a · b mod P`.
const fn mult_mod_p(a: u32, mut b: u32) -> u32 {
    if a == 0 {
        return 0;
    }
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                return p;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
}

/// `X2N[k]` = x^(2^k) mod P, for every bit of a byte length in bits (k < 3 + 64). zlib
/// keeps 32 and wraps, which relies on x^(2^32) = x for its polynomial; kept whole here
/// rather than argued for CRC32C's.
const X2N: [u32; 67] = {
    let mut t = [0u32; 67];
    let mut p = 1u32 << 30; // x^1
    let mut k = 0;
    while k < 67 {
        t[k] = p;
        p = mult_mod_p(p, p);
        k += 1;
    }
    t
};

/// x^(n · 2^k) mod P.
fn x2n_mod_p(mut n: u64, mut k: usize) -> u32 {
    let mut p = 1u32 << 31; // x^0
    while n != 0 {
        if n & 1 != 0 {
            p = mult_mod_p(X2N[k], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

/// The CRC32C of `A ‖ B` from `crc_a` = CRC32C(A), `crc_b` = CRC32C(B) and `len_b` = the
/// length of B in bytes.
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    // x^(8·len_b): k = 3 starts at x^(2^3).
    mult_mod_p(x2n_mod_p(len_b, 3), crc_a) ^ crc_b
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn combine_equals_reading_the_whole() {
        let data: Vec<u8> = (0..3_000_017u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        for split in [
            0usize,
            1,
            7,
            64,
            4095,
            65_536,
            1 << 20,
            2_999_999,
            3_000_017,
        ] {
            let (a, b) = data.split_at(split);
            assert_eq!(
                crc32c_combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len() as u64),
                crc32c::crc32c(&data),
                "split at {split}"
            );
        }
        // Empty B changes nothing; the crate's (slow) combine agrees on odd values.
        assert_eq!(crc32c_combine(0xdead_beef, 0, 0), 0xdead_beef);
        for (a, b, n) in [
            (1u32, 2u32, 3u64),
            (0xffff_ffff, 0x1234_5678, 1 << 33),
            (7, 9, 999),
        ] {
            assert_eq!(
                crc32c_combine(a, b, n),
                crc32c::crc32c_combine(a, b, n as usize),
                "{a:x} {b:x} {n}"
            );
        }
    }
}
