//! Numbers written into a string by hand, for the lines the request path writes every
//! time (the access log, Redis counter names and arguments, request ids): `write!` goes
//! through the formatting machinery, about ten times the cost of these.

/// `n` in decimal, as `Display` writes it.
pub fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// `n` in decimal with its sign.
pub fn push_i128(out: &mut String, n: i128) {
    if n < 0 {
        out.push('-');
    }
    match u64::try_from(n.unsigned_abs()) {
        Ok(v) => push_u64(out, v),
        Err(_) => out.push_str(&n.unsigned_abs().to_string()),
    }
}

/// The low `digits` hex digits of `n`, lowercase, zero-padded (`{:0digits$x}` for a value
/// that fits).
pub fn push_hex(out: &mut String, n: u64, digits: u32) {
    let digits = digits.min(16) as usize;
    let mut buf = [0u8; 16];
    for (i, b) in buf[..digits].iter_mut().enumerate() {
        *b = b"0123456789abcdef"[(n >> ((digits - 1 - i) * 4)) as usize & 15];
    }
    out.push_str(std::str::from_utf8(&buf[..digits]).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_as_format_writes_them() {
        for n in [0, 7, 10, 99, 1_000_000, u64::MAX] {
            let mut s = String::new();
            push_u64(&mut s, n);
            assert_eq!(s, n.to_string());
            let mut h = String::new();
            push_hex(&mut h, n, 16);
            assert_eq!(h, format!("{n:016x}"));
        }
        for n in [0i128, -7, 42, -(1i128 << 70), i128::from(u64::MAX)] {
            let mut s = String::new();
            push_i128(&mut s, n);
            assert_eq!(s, n.to_string());
        }
    }
}
