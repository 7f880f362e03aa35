//! SipHash-1-3 over 64-bit words: the kernel's request digests (keyed per
//! load) and the `AF_UNIX` rule names (a fixed key, [`super::unix_rule_hash`]),
//! one implementation for both sides so user space computes the exact value
//! the kernel does.

/// Incremental SipHash-1-3 state over whole 64-bit words.
pub struct SipHash13 {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
    words: u64,
}

#[expect(
    clippy::inline_always,
    reason = "the eBPF programs hash in loops the verifier walks: a call per word would cost a BPF call frame each"
)]
impl SipHash13 {
    #[must_use]
    #[inline(always)]
    pub fn new([k0, k1]: [u64; 2]) -> Self {
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

    #[must_use]
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
