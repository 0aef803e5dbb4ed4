//! LZF, the compression Redis applies to RDB strings longer than 20 bytes
//! (`rdbLoadLzfStringObject` in rdb.c, `lzf_d.c`).
//!
//! A compressed stream is a series of runs: a control byte below 32 starts a literal run of
//! `ctrl + 1` bytes; any other control byte is a back-reference of length `(ctrl >> 5) + 2`
//! (with one extra length byte when the 3 bits are all set) into the last 8 KiB of output.
//! [`decompress`] rebuilds a blob that must be inspected (a listpack); [`LzfCheck`] only
//! proves a stream is well formed and of the declared size, without keeping the output, so a
//! 500 MB compressed value is checked in constant memory.

/// Decompresses `input` into exactly `expected_len` bytes; anything else is an error.
pub(crate) fn decompress(input: &[u8], expected_len: usize) -> Result<Vec<u8>, &'static str> {
    let mut out: Vec<u8> = Vec::with_capacity(expected_len);
    let mut ip = 0usize;
    while ip < input.len() {
        let ctrl = usize::from(input[ip]);
        ip += 1;
        if ctrl < 32 {
            let run = ctrl + 1;
            let lit = input
                .get(ip..ip + run)
                .ok_or("LZF literal run past the end")?;
            if out.len() + run > expected_len {
                return Err("LZF output longer than declared");
            }
            out.extend_from_slice(lit);
            ip += run;
        } else {
            let mut len = ctrl >> 5;
            if len == 7 {
                len += usize::from(*input.get(ip).ok_or("LZF back-reference past the end")?);
                ip += 1;
            }
            let low = usize::from(*input.get(ip).ok_or("LZF back-reference past the end")?);
            ip += 1;
            let distance = ((ctrl & 0x1F) << 8) + low + 1;
            let len = len + 2;
            if distance > out.len() {
                return Err("LZF back-reference before the start of the output");
            }
            if out.len() + len > expected_len {
                return Err("LZF output longer than declared");
            }
            let start = out.len() - distance;
            for i in 0..len {
                let byte = out[start + i];
                out.push(byte);
            }
        }
    }
    if out.len() != expected_len {
        return Err("LZF output shorter than declared");
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Control,
    Literal(u64),
    LengthByte(u8),
    LowByte { ctrl: u8, len: u64 },
}

/// Checks an LZF stream fed in arbitrary pieces: every back-reference lands inside the
/// output produced so far and the output has exactly the declared length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LzfCheck {
    produced: u64,
    expected: u64,
    step: Step,
}

impl LzfCheck {
    pub(crate) fn new(expected: u64) -> Self {
        Self {
            produced: 0,
            expected,
            step: Step::Control,
        }
    }

    fn produce(&mut self, n: u64) -> Result<(), &'static str> {
        self.produced += n;
        if self.produced > self.expected {
            return Err("LZF output longer than declared");
        }
        Ok(())
    }

    pub(crate) fn feed(&mut self, mut data: &[u8]) -> Result<(), &'static str> {
        while !data.is_empty() {
            match self.step {
                Step::Literal(left) => {
                    let n = left.min(data.len() as u64);
                    data = &data[n as usize..];
                    self.step = if n == left {
                        Step::Control
                    } else {
                        Step::Literal(left - n)
                    };
                }
                Step::Control => {
                    let ctrl = data[0];
                    data = &data[1..];
                    if ctrl < 32 {
                        let run = u64::from(ctrl) + 1;
                        self.produce(run)?;
                        self.step = Step::Literal(run);
                    } else if ctrl >> 5 == 7 {
                        self.step = Step::LengthByte(ctrl);
                    } else {
                        self.step = Step::LowByte {
                            ctrl,
                            len: u64::from(ctrl >> 5),
                        };
                    }
                }
                Step::LengthByte(ctrl) => {
                    let len = 7 + u64::from(data[0]);
                    data = &data[1..];
                    self.step = Step::LowByte { ctrl, len };
                }
                Step::LowByte { ctrl, len } => {
                    let distance = (u64::from(ctrl & 0x1F) << 8) + u64::from(data[0]) + 1;
                    data = &data[1..];
                    if distance > self.produced {
                        return Err("LZF back-reference before the start of the output");
                    }
                    self.produce(len + 2)?;
                    self.step = Step::Control;
                }
            }
        }
        Ok(())
    }

    /// Call once the compressed length has been fed.
    pub(crate) fn finish(&self) -> Result<(), &'static str> {
        if self.step != Step::Control {
            return Err("LZF stream ends inside a run");
        }
        if self.produced != self.expected {
            return Err("LZF output shorter than declared");
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A tiny LZF compressor for tests: literal runs plus back-references to repeats of
    /// the previous byte run, enough to exercise both kinds of run.
    pub(crate) fn compress_for_test(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        let mut lit: Vec<u8> = Vec::new();
        let flush = |lit: &mut Vec<u8>, out: &mut Vec<u8>| {
            for chunk in lit.chunks(32) {
                out.push((chunk.len() - 1) as u8);
                out.extend_from_slice(chunk);
            }
            lit.clear();
        };
        while i < data.len() {
            // repeat of the previous byte (distance 1) for at least 3 bytes
            if i > 0 {
                let mut run = 0;
                while i + run < data.len() && data[i + run] == data[i - 1] && run < 264 {
                    run += 1;
                }
                if run >= 3 {
                    flush(&mut lit, &mut out);
                    let len = run - 2;
                    if len < 7 {
                        out.push((len as u8) << 5);
                    } else {
                        out.push(7 << 5);
                        out.push((len - 7) as u8);
                    }
                    out.push(0);
                    i += run;
                    continue;
                }
            }
            lit.push(data[i]);
            i += 1;
        }
        flush(&mut lit, &mut out);
        out
    }

    #[test]
    fn roundtrip_and_streaming_check_agree() {
        let mut data = b"hello ".to_vec();
        data.extend(std::iter::repeat_n(b'z', 500));
        data.extend_from_slice(b"tail");
        let c = compress_for_test(&data);
        assert!(c.len() < data.len());
        assert_eq!(decompress(&c, data.len()).unwrap(), data);
        for split in 0..c.len() {
            let mut chk = LzfCheck::new(data.len() as u64);
            chk.feed(&c[..split]).unwrap();
            chk.feed(&c[split..]).unwrap();
            chk.finish().unwrap();
        }
        assert!(decompress(&c, data.len() + 1).is_err());
        let mut chk = LzfCheck::new(data.len() as u64 - 1);
        assert!(chk.feed(&c).is_err() || chk.finish().is_err());
        // a back-reference first is invalid
        assert!(decompress(&[0x20, 0x00], 3).is_err());
        assert!(LzfCheck::new(3).feed(&[0x20, 0x00]).is_err());
    }
}
