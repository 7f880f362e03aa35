//! Keyed request digests (SipHash-1-3 over 64-bit words).
//!
//! A verdict is bound to the digest of what was asked; the key is random
//! per load so a workload cannot craft a different request that collides
//! with an approved one.

use crate::maps::digest_key;

/// Incremental SipHash-1-3 state.
pub struct Digest {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
    words: u64,
}

impl Digest {
    #[inline(always)]
    pub fn new() -> Self {
        let [k0, k1] = digest_key();
        Self {
            v0: k0 ^ 0x736f_6d65_7073_6575,
            v1: k1 ^ 0x646f_7261_6e64_6f6d,
            v2: k0 ^ 0x6c79_6765_6e65_7261,
            v3: k1 ^ 0x7465_6462_7974_6573,
            words: 0,
        }
    }

    #[inline(always)]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13) ^ self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16) ^ self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21) ^ self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17) ^ self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    #[inline(always)]
    pub fn word(&mut self, m: u64) {
        self.v3 ^= m;
        self.round();
        self.v0 ^= m;
        self.words += 1;
    }

    /// Hashes the whole 64-byte blocks of `bytes` that hold its first `len`
    /// bytes (at most `max` bytes, a multiple of 64): the caller zeroes the
    /// rest of the last block. The loop's only branch is its exit, so the
    /// verifier walks each block once, and a short input costs one or two
    /// blocks instead of the whole window.
    ///
    /// # Safety
    ///
    /// `bytes` is valid for `max` bytes.
    #[inline(always)]
    pub unsafe fn blocks(&mut self, bytes: *const u8, len: usize, max: usize) {
        const BLOCK: usize = 64;
        let words = bytes.cast::<u64>();
        let used_blocks = len.div_ceil(BLOCK);
        let mut block = 0;
        while block < max / BLOCK {
            if block >= used_blocks {
                break;
            }
            let mut i = 0;
            while i < BLOCK / 8 {
                // SAFETY: (caller) inside the first `max` bytes.
                self.word(unsafe { words.add(block * (BLOCK / 8) + i).read_unaligned() });
                i += 1;
            }
            block += 1;
        }
    }

    #[inline(always)]
    pub fn finish(mut self) -> u64 {
        let words = self.words;
        self.word(words << 56);
        self.v2 ^= 0xff;
        self.round();
        self.round();
        self.round();
        self.v0 ^ self.v1 ^ self.v2 ^ self.v3
    }
}
