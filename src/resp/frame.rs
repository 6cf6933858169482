//! RESP2/RESP3 frames: an incremental, size-capped parser and allocation-free encoders.
//!
//! Shape (mini-redis): [`check`] walks the buffered bytes without allocating and says whether one
//! whole frame is there (`Ok(None)` = not yet: "incomplete" is a normal outcome, never an error);
//! only then is the frame split off the read buffer (`BytesMut::split_to` + `freeze`, O(1)) and
//! [`parse`]d into a [`Frame`] whose strings are `Bytes` slices of that buffer: no bulk string is
//! copied. Garbage is a [`ProtocolError`] whose `Display` is the text Redis puts after
//! `-ERR Protocol error: `; the server answers that and closes the connection.
//!
//! Every length read off the wire is checked against [`Limits`] before it is trusted, so a peer
//! cannot make us wait for (or reserve) more than `bulk_bytes_max` for one string,
//! `array_len_max` elements, `depth_max` levels of nesting or `inline_bytes_max` for one line.
//! The parser never reserves memory from a declared length: arrays are built only after `check`
//! proved all their elements are already in the buffer, so memory is bounded by bytes received.
//!
//! Cost sketch: a pipelined client sends ~40-byte GETs; `check` + `parse` touch each byte about
//! twice and allocate nothing for a bulk string (one `Vec` per array), well under 1 us each.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

/// Caps on what one frame may declare. A peer exceeding one gets a [`ProtocolError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string (`$`, `!`, `=`) payload, in bytes.
    pub bulk_bytes_max: usize,
    /// Most elements in one aggregate (`*`, `~`, `>`; a map of n pairs counts 2n).
    pub array_len_max: usize,
    /// Deepest nesting of aggregates; a request (array of bulk strings) has depth 1.
    pub depth_max: usize,
    /// Longest line: an inline command, a simple string or an error, in bytes.
    pub inline_bytes_max: usize,
}

impl Limits {
    /// Redis' own caps: `proto-max-bulk-len` 512 MiB, inline requests 64 KiB.
    pub const DEFAULT: Limits = Limits {
        bulk_bytes_max: 512 * 1024 * 1024,
        array_len_max: 1024 * 1024,
        depth_max: 32,
        inline_bytes_max: 64 * 1024,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// Longest integer header line we accept: sign + 19 digits of an i64, with slack.
const INTEGER_LINE_BYTES_MAX: usize = 32;

/// Which dialect a reply is encoded in (`HELLO 3` switches a connection to RESP3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Resp2,
    Resp3,
}

/// One RESP value. Strings are slices of the receive buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// `+OK`
    Simple(Bytes),
    /// `-ERR ...`: the whole message, including the leading code word.
    Error(Bytes),
    /// `:42`
    Integer(i64),
    /// `$3\r\nfoo`
    Bulk(Bytes),
    /// `$-1`, `*-1` (RESP2) or `_` (RESP3).
    Null,
    /// `*n`
    Array(Vec<Frame>),
    /// RESP3 `#t` / `#f`.
    Boolean(bool),
    /// RESP3 `,1.5`, kept as its text so that it round-trips exactly.
    Double(Bytes),
    /// RESP3 `(123...`, as its text.
    BigNumber(Bytes),
    /// RESP3 `!n`: an error that may contain any byte.
    BulkError(Bytes),
    /// RESP3 `=n`: `fmt:text`, kept whole (format included).
    Verbatim(Bytes),
    /// RESP3 `%n`: n key/value pairs.
    Map(Vec<(Frame, Frame)>),
    /// RESP3 `~n`.
    Set(Vec<Frame>),
    /// RESP3 `>n`: out-of-band data (e.g. invalidation messages).
    Push(Vec<Frame>),
}

/// Why bytes are not RESP. `Display` is worded as Redis words it after `Protocol error: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid multibulk length")]
    InvalidMultibulkLength,
    #[error("invalid bulk length")]
    InvalidBulkLength,
    #[error("expected '$', got '{}'", char::from(*.0))]
    ExpectedBulk(u8),
    #[error("too big inline request")]
    InlineTooBig,
    #[error("unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("invalid frame type byte 0x{0:02x} at offset {1}")]
    InvalidType(u8, usize),
    #[error("invalid integer at offset {0}")]
    InvalidInteger(usize),
    #[error("expected CRLF at offset {0}")]
    ExpectedCrlf(usize),
    #[error("nesting deeper than {0} levels")]
    TooDeep(usize),
    #[error("invalid RESP3 value at offset {0}")]
    InvalidValue(usize),
}

/// Internal outcome of a walk: either more bytes are needed or the bytes are bad.
enum Halt {
    Incomplete,
    Bad(ProtocolError),
}

impl From<ProtocolError> for Halt {
    fn from(e: ProtocolError) -> Self {
        Halt::Bad(e)
    }
}

type Walk<T> = Result<T, Halt>;

/// Whether `buf` starts with one whole frame: `Ok(Some(len))` when its first `len` bytes are one,
/// `Ok(None)` when more bytes are needed. Allocates nothing.
pub fn check(buf: &[u8], limits: &Limits) -> Result<Option<usize>, ProtocolError> {
    match check_at(buf, 0, limits, 0) {
        Ok(end) => Ok(Some(end)),
        Err(Halt::Incomplete) => Ok(None),
        Err(Halt::Bad(e)) => Err(e),
    }
}

/// Parses one whole frame that [`check`] accepted; strings become slices of `frame`.
pub fn parse(frame: &Bytes, limits: &Limits) -> Result<Frame, ProtocolError> {
    match parse_at(frame, 0, limits, 0) {
        Ok((value, end)) if end == frame.len() => Ok(value),
        Ok((_, end)) => Err(ProtocolError::InvalidValue(end)),
        // The caller promised a whole frame; bytes missing inside it are a framing error.
        Err(Halt::Incomplete) => Err(ProtocolError::InvalidValue(frame.len())),
        Err(Halt::Bad(e)) => Err(e),
    }
}

/// Takes the first whole frame off the front of `buf`, or returns `Ok(None)` (and leaves `buf`
/// alone) when it is not all there yet.
pub fn decode(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Frame>, ProtocolError> {
    let Some(len) = check(buf, limits)? else {
        return Ok(None);
    };
    let frame = buf.split_to(len).freeze();
    parse(&frame, limits).map(Some)
}

/// Reads a line starting at `pos`: returns (end of content, position after CRLF).
/// `max` bounds the content, so a peer cannot make us buffer an endless line.
fn line(buf: &[u8], pos: usize, max: usize, too_long: ProtocolError) -> Walk<(usize, usize)> {
    let avail = &buf[pos.min(buf.len())..];
    let window = &avail[..avail.len().min(max + 1)];
    match window.iter().position(|&b| b == b'\r') {
        Some(i) => {
            let cr = pos + i;
            match buf.get(cr + 1) {
                None => Err(Halt::Incomplete),
                Some(b'\n') => Ok((cr, cr + 2)),
                Some(_) => Err(Halt::Bad(ProtocolError::ExpectedCrlf(cr))),
            }
        }
        None if window.len() > max => Err(Halt::Bad(too_long)),
        None => Err(Halt::Incomplete),
    }
}

/// Strict decimal i64: optional '-', at least one digit, no overflow, nothing else.
pub fn parse_i64(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some(_) => (false, text),
        None => return None,
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut value: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let digit = i64::from(d - b'0');
        // Accumulate negatively so that i64::MIN parses.
        value = value.checked_mul(10)?.checked_sub(digit)?;
    }
    if negative {
        Some(value)
    } else {
        value.checked_neg()
    }
}

/// Reads `<type byte><integer>\r\n` at `pos`: returns (value, position after CRLF).
fn header(buf: &[u8], pos: usize, bad: ProtocolError) -> Walk<(i64, usize)> {
    let (end, next) = line(buf, pos + 1, INTEGER_LINE_BYTES_MAX, bad.clone())?;
    let value = parse_i64(&buf[pos + 1..end]).ok_or(Halt::Bad(bad))?;
    Ok((value, next))
}

fn aggregate_len(count: i64, per_item: usize, limits: &Limits) -> Result<usize, ProtocolError> {
    let count = usize::try_from(count).map_err(|_| ProtocolError::InvalidMultibulkLength)?;
    match count.checked_mul(per_item) {
        Some(n) if n <= limits.array_len_max => Ok(count),
        _ => Err(ProtocolError::InvalidMultibulkLength),
    }
}

fn bulk_len(len: i64, limits: &Limits) -> Result<usize, ProtocolError> {
    match usize::try_from(len) {
        Ok(n) if n <= limits.bulk_bytes_max => Ok(n),
        _ => Err(ProtocolError::InvalidBulkLength),
    }
}

/// End of the bulk payload of `len` bytes starting at `start`, checking its CRLF.
fn bulk_end(buf: &[u8], start: usize, len: usize) -> Walk<usize> {
    let end = start + len;
    if buf.len() < end + 2 {
        return Err(Halt::Incomplete);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(Halt::Bad(ProtocolError::ExpectedCrlf(end)));
    }
    Ok(end)
}

fn check_at(buf: &[u8], pos: usize, limits: &Limits, depth: usize) -> Walk<usize> {
    let Some(&kind) = buf.get(pos) else {
        return Err(Halt::Incomplete);
    };
    match kind {
        b'+' | b'-' => Ok(line(
            buf,
            pos + 1,
            limits.inline_bytes_max,
            ProtocolError::InlineTooBig,
        )?
        .1),
        b',' | b'(' => {
            let (end, next) = line(
                buf,
                pos + 1,
                INTEGER_LINE_BYTES_MAX * 16,
                ProtocolError::InvalidValue(pos),
            )?;
            if end == pos + 1 {
                return Err(Halt::Bad(ProtocolError::InvalidValue(pos)));
            }
            Ok(next)
        }
        b':' => Ok(header(buf, pos, ProtocolError::InvalidInteger(pos))?.1),
        b'_' => match buf.get(pos + 1..pos + 3) {
            None => Err(Halt::Incomplete),
            Some(b"\r\n") => Ok(pos + 3),
            Some(_) => Err(Halt::Bad(ProtocolError::ExpectedCrlf(pos + 1))),
        },
        b'#' => {
            let (end, next) = line(buf, pos + 1, 1, ProtocolError::InvalidValue(pos))?;
            match &buf[pos + 1..end] {
                b"t" | b"f" => Ok(next),
                _ => Err(Halt::Bad(ProtocolError::InvalidValue(pos))),
            }
        }
        b'$' | b'!' | b'=' => {
            let (len, start) = header(buf, pos, ProtocolError::InvalidBulkLength)?;
            if len == -1 && kind == b'$' {
                return Ok(start);
            }
            let len = bulk_len(len, limits)?;
            let end = bulk_end(buf, start, len)?;
            if kind == b'=' && (len < 4 || buf[start + 3] != b':') {
                return Err(Halt::Bad(ProtocolError::InvalidValue(pos)));
            }
            Ok(end + 2)
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let (count, mut next) = header(buf, pos, ProtocolError::InvalidMultibulkLength)?;
            if count == -1 && kind == b'*' {
                return Ok(next);
            }
            let per_item = if matches!(kind, b'%' | b'|') { 2 } else { 1 };
            let items = aggregate_len(count, per_item, limits)? * per_item;
            if depth + 1 > limits.depth_max {
                return Err(Halt::Bad(ProtocolError::TooDeep(limits.depth_max)));
            }
            for _ in 0..items {
                next = check_at(buf, next, limits, depth + 1)?;
            }
            if kind == b'|' {
                // An attribute decorates the frame that follows it; both are one unit.
                next = check_at(buf, next, limits, depth)?;
            }
            Ok(next)
        }
        other => Err(Halt::Bad(ProtocolError::InvalidType(other, pos))),
    }
}

fn parse_at(buf: &Bytes, pos: usize, limits: &Limits, depth: usize) -> Walk<(Frame, usize)> {
    let Some(&kind) = buf.get(pos) else {
        return Err(Halt::Incomplete);
    };
    let text_line = |max: usize| -> Walk<(Bytes, usize)> {
        let (end, next) = line(buf, pos + 1, max, ProtocolError::InlineTooBig)?;
        Ok((buf.slice(pos + 1..end), next))
    };
    match kind {
        b'+' => text_line(limits.inline_bytes_max).map(|(s, n)| (Frame::Simple(s), n)),
        b'-' => text_line(limits.inline_bytes_max).map(|(s, n)| (Frame::Error(s), n)),
        b',' => text_line(INTEGER_LINE_BYTES_MAX * 16).map(|(s, n)| (Frame::Double(s), n)),
        b'(' => text_line(INTEGER_LINE_BYTES_MAX * 16).map(|(s, n)| (Frame::BigNumber(s), n)),
        b':' => {
            let (value, next) = header(buf, pos, ProtocolError::InvalidInteger(pos))?;
            Ok((Frame::Integer(value), next))
        }
        b'_' => Ok((Frame::Null, check_at(buf, pos, limits, depth)?)),
        b'#' => {
            let next = check_at(buf, pos, limits, depth)?;
            Ok((Frame::Boolean(buf[pos + 1] == b't'), next))
        }
        b'$' | b'!' | b'=' => {
            let (len, start) = header(buf, pos, ProtocolError::InvalidBulkLength)?;
            if len == -1 && kind == b'$' {
                return Ok((Frame::Null, start));
            }
            let len = bulk_len(len, limits)?;
            let end = bulk_end(buf, start, len)?;
            let payload = buf.slice(start..end);
            let value = match kind {
                b'$' => Frame::Bulk(payload),
                b'!' => Frame::BulkError(payload),
                _ => {
                    if len < 4 || buf[start + 3] != b':' {
                        return Err(Halt::Bad(ProtocolError::InvalidValue(pos)));
                    }
                    Frame::Verbatim(payload)
                }
            };
            Ok((value, end + 2))
        }
        b'*' | b'~' | b'>' => {
            let (count, mut next) = header(buf, pos, ProtocolError::InvalidMultibulkLength)?;
            if count == -1 && kind == b'*' {
                return Ok((Frame::Null, next));
            }
            let count = aggregate_len(count, 1, limits)?;
            if depth + 1 > limits.depth_max {
                return Err(Halt::Bad(ProtocolError::TooDeep(limits.depth_max)));
            }
            // `count` items each take at least 3 bytes, so this never reserves more than the
            // frame that is already buffered could hold.
            let mut items = Vec::with_capacity(count.min(buf.len() / 3));
            for _ in 0..count {
                let (item, n) = parse_at(buf, next, limits, depth + 1)?;
                items.push(item);
                next = n;
            }
            let value = match kind {
                b'*' => Frame::Array(items),
                b'~' => Frame::Set(items),
                _ => Frame::Push(items),
            };
            Ok((value, next))
        }
        b'%' | b'|' => {
            let (count, mut next) = header(buf, pos, ProtocolError::InvalidMultibulkLength)?;
            let count = aggregate_len(count, 2, limits)?;
            if depth + 1 > limits.depth_max {
                return Err(Halt::Bad(ProtocolError::TooDeep(limits.depth_max)));
            }
            let mut pairs = Vec::with_capacity(count.min(buf.len() / 6));
            for _ in 0..count {
                let (key, n) = parse_at(buf, next, limits, depth + 1)?;
                let (value, n) = parse_at(buf, n, limits, depth + 1)?;
                pairs.push((key, value));
                next = n;
            }
            if kind == b'|' {
                // Attributes carry optional metadata that no command of ours needs: skip them.
                return parse_at(buf, next, limits, depth);
            }
            Ok((Frame::Map(pairs), next))
        }
        other => Err(Halt::Bad(ProtocolError::InvalidType(other, pos))),
    }
}

// ---------------------------------------------------------------------------------------------
// Requests: arrays of bulk strings, or inline commands (telnet, redis-cli in some modes).
// ---------------------------------------------------------------------------------------------

/// Takes the next request off the front of `buf` into `args` (cleared first; reuse it across
/// calls). Returns `Ok(false)` when no whole request is buffered yet. Empty requests (a blank
/// inline line, `*0`) are skipped, as Redis does. Bulk arguments are slices of `buf`, not copies.
pub fn decode_request(
    buf: &mut BytesMut,
    limits: &Limits,
    args: &mut Vec<Bytes>,
) -> Result<bool, ProtocolError> {
    loop {
        args.clear();
        let Some(&first) = buf.first() else {
            return Ok(false);
        };
        let done = if first == b'*' {
            decode_multibulk(buf, limits, args)?
        } else {
            decode_inline(buf, limits, args)?
        };
        if !done {
            return Ok(false);
        }
        if !args.is_empty() {
            return Ok(true);
        }
    }
}

fn decode_multibulk(
    buf: &mut BytesMut,
    limits: &Limits,
    args: &mut Vec<Bytes>,
) -> Result<bool, ProtocolError> {
    // Check pass: find the end without allocating.
    let walk = |buf: &[u8]| -> Walk<(usize, usize)> {
        let (count, mut next) = header(buf, 0, ProtocolError::InvalidMultibulkLength)?;
        if count <= 0 {
            // Redis ignores `*0` and `*-1` requests.
            return Ok((0, next));
        }
        let count = aggregate_len(count, 1, limits)?;
        for _ in 0..count {
            match buf.get(next) {
                None => return Err(Halt::Incomplete),
                Some(b'$') => {}
                Some(&other) => return Err(Halt::Bad(ProtocolError::ExpectedBulk(other))),
            }
            let (len, start) = header(buf, next, ProtocolError::InvalidBulkLength)?;
            let len = bulk_len(len, limits)?;
            next = bulk_end(buf, start, len)? + 2;
        }
        Ok((count, next))
    };
    let (count, len) = match walk(buf) {
        Ok(v) => v,
        Err(Halt::Incomplete) => return Ok(false),
        Err(Halt::Bad(e)) => return Err(e),
    };
    let frame = buf.split_to(len).freeze();
    // Parse pass over bytes the check pass proved well formed.
    let mut next = match frame.iter().position(|&b| b == b'\n') {
        Some(i) => i + 1,
        None => return Err(ProtocolError::InvalidMultibulkLength),
    };
    for _ in 0..count {
        let (arg_len, start) = match header(&frame, next, ProtocolError::InvalidBulkLength) {
            Ok(v) => v,
            Err(_) => return Err(ProtocolError::InvalidBulkLength),
        };
        let end = start + arg_len as usize;
        args.push(frame.slice(start..end));
        next = end + 2;
    }
    debug_assert_eq!(next, len);
    Ok(true)
}

fn decode_inline(
    buf: &mut BytesMut,
    limits: &Limits,
    args: &mut Vec<Bytes>,
) -> Result<bool, ProtocolError> {
    let window = &buf[..buf.len().min(limits.inline_bytes_max + 1)];
    let Some(newline) = window.iter().position(|&b| b == b'\n') else {
        if window.len() > limits.inline_bytes_max {
            return Err(ProtocolError::InlineTooBig);
        }
        return Ok(false);
    };
    let line = buf.split_to(newline + 1).freeze();
    let mut end = newline;
    if end > 0 && line[end - 1] == b'\r' {
        end -= 1;
    }
    split_inline(&line, end, limits, args)?;
    Ok(true)
}

/// Splits an inline line the way Redis' `sdssplitargs` does: whitespace separates arguments,
/// "double quotes" take C escapes (\n \r \t \b \a \\ \" \xHH), 'single quotes' take \'.
/// Plain arguments are slices of `line`; only quoted ones with escapes are copied.
fn split_inline(
    line: &Bytes,
    end: usize,
    limits: &Limits,
    args: &mut Vec<Bytes>,
) -> Result<(), ProtocolError> {
    let mut i = 0;
    loop {
        while i < end && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == end {
            return Ok(());
        }
        if args.len() >= limits.array_len_max {
            return Err(ProtocolError::InvalidMultibulkLength);
        }
        let quote = line[i];
        if quote != b'"' && quote != b'\'' {
            let start = i;
            while i < end && !line[i].is_ascii_whitespace() {
                i += 1;
            }
            args.push(line.slice(start..i));
            continue;
        }
        i += 1;
        let mut arg = Vec::new();
        loop {
            if i >= end {
                return Err(ProtocolError::UnbalancedQuotes);
            }
            let b = line[i];
            if quote == b'"' && b == b'\\' && i + 1 < end {
                let hex = |c: u8| (c as char).to_digit(16);
                let escaped = line[i + 1];
                if escaped == b'x' && i + 3 < end {
                    if let (Some(h), Some(l)) = (hex(line[i + 2]), hex(line[i + 3])) {
                        arg.push((h * 16 + l) as u8);
                        i += 4;
                        continue;
                    }
                }
                arg.push(match escaped {
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'b' => 0x08,
                    b'a' => 0x07,
                    other => other,
                });
                i += 2;
            } else if quote == b'\'' && b == b'\\' && i + 1 < end && line[i + 1] == b'\'' {
                arg.push(b'\'');
                i += 2;
            } else if b == quote {
                // The closing quote must be followed by a space or the end of the line.
                if i + 1 < end && !line[i + 1].is_ascii_whitespace() {
                    return Err(ProtocolError::UnbalancedQuotes);
                }
                i += 1;
                break;
            } else {
                arg.push(b);
                i += 1;
            }
        }
        args.push(Bytes::from(arg));
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding: straight into the caller's BytesMut, no allocation besides its growth.
// ---------------------------------------------------------------------------------------------

/// Formats `value` in decimal into the tail of `scratch`; returns the digits (no allocation).
pub fn format_i64(value: i64, scratch: &mut [u8; 20]) -> &[u8] {
    let mut i = scratch.len();
    // unsigned_abs avoids overflow on i64::MIN.
    let mut n = value.unsigned_abs();
    loop {
        i -= 1;
        scratch[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if value < 0 {
        i -= 1;
        scratch[i] = b'-';
    }
    &scratch[i..]
}

/// Appends the decimal text of `value` (no allocation).
pub fn put_decimal(out: &mut BytesMut, value: i64) {
    let mut scratch = [0u8; 20];
    out.put_slice(format_i64(value, &mut scratch));
}

fn put_header(out: &mut BytesMut, kind: u8, value: i64) {
    out.put_u8(kind);
    put_decimal(out, value);
    out.put_slice(b"\r\n");
}

fn put_len(out: &mut BytesMut, kind: u8, len: usize) {
    put_header(out, kind, i64::try_from(len).unwrap_or(i64::MAX));
}

/// `+text\r\n`. `text` must not contain CR or LF (debug-asserted: a caller bug).
pub fn put_simple(out: &mut BytesMut, text: &[u8]) {
    debug_assert!(!text.iter().any(|&b| b == b'\r' || b == b'\n'));
    out.put_u8(b'+');
    out.put_slice(text);
    out.put_slice(b"\r\n");
}

/// `-message\r\n`, e.g. `put_error(out, b"ERR syntax error")`. CR/LF in `message` are replaced
/// by spaces, as Redis does, so that a message quoting client input cannot break framing.
pub fn put_error(out: &mut BytesMut, message: &[u8]) {
    out.put_u8(b'-');
    out.reserve(message.len() + 2);
    for &b in message {
        out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
    out.put_slice(b"\r\n");
}

/// `:value\r\n`
pub fn put_integer(out: &mut BytesMut, value: i64) {
    put_header(out, b':', value);
}

/// `$len\r\nbytes\r\n`
pub fn put_bulk(out: &mut BytesMut, bytes: &[u8]) {
    put_len(out, b'$', bytes.len());
    out.put_slice(bytes);
    out.put_slice(b"\r\n");
}

/// A bulk string holding the decimal text of `value` (no allocation).
pub fn put_bulk_decimal(out: &mut BytesMut, value: i64) {
    let mut scratch = [0u8; 20];
    put_bulk(out, format_i64(value, &mut scratch));
}

/// The null bulk string of the connection's dialect.
pub fn put_null(out: &mut BytesMut, protocol: Protocol) {
    out.put_slice(match protocol {
        Protocol::Resp2 => b"$-1\r\n",
        Protocol::Resp3 => b"_\r\n",
    });
}

/// `*len\r\n`; the caller then puts `len` elements.
pub fn put_array_len(out: &mut BytesMut, len: usize) {
    put_len(out, b'*', len);
}

/// A map header: `%len` in RESP3, `*2len` (flattened pairs) in RESP2.
pub fn put_map_len(out: &mut BytesMut, pairs: usize, protocol: Protocol) {
    match protocol {
        Protocol::Resp2 => put_len(out, b'*', pairs.saturating_mul(2)),
        Protocol::Resp3 => put_len(out, b'%', pairs),
    }
}

/// A request: an array of bulk strings, the form every Redis server accepts.
pub fn put_request(out: &mut BytesMut, args: &[&[u8]]) {
    put_array_len(out, args.len());
    for arg in args {
        put_bulk(out, arg);
    }
}

impl Frame {
    /// Appends this frame in `protocol`'s dialect. RESP3-only types are written as their nearest
    /// RESP2 form when `protocol` is RESP2 (as Redis does for RESP2 clients).
    pub fn encode(&self, out: &mut BytesMut, protocol: Protocol) {
        let resp3 = protocol == Protocol::Resp3;
        match self {
            Frame::Simple(s) => put_simple(out, s),
            Frame::Error(s) => put_error(out, s),
            Frame::Integer(i) => put_integer(out, *i),
            Frame::Bulk(b) => put_bulk(out, b),
            Frame::Null => put_null(out, protocol),
            Frame::Array(items) => put_items(out, b'*', items, protocol),
            Frame::Set(items) => put_items(out, if resp3 { b'~' } else { b'*' }, items, protocol),
            Frame::Push(items) => put_items(out, if resp3 { b'>' } else { b'*' }, items, protocol),
            Frame::Boolean(v) if resp3 => out.put_slice(if *v { b"#t\r\n" } else { b"#f\r\n" }),
            Frame::Boolean(v) => put_integer(out, i64::from(*v)),
            Frame::Double(text) if resp3 => put_line(out, b',', text),
            Frame::BigNumber(text) if resp3 => put_line(out, b'(', text),
            Frame::Double(text) | Frame::BigNumber(text) => put_bulk(out, text),
            Frame::BulkError(text) if resp3 => {
                put_len(out, b'!', text.len());
                out.put_slice(text);
                out.put_slice(b"\r\n");
            }
            Frame::BulkError(text) => put_error(out, text),
            Frame::Verbatim(text) if resp3 => {
                put_len(out, b'=', text.len());
                out.put_slice(text);
                out.put_slice(b"\r\n");
            }
            Frame::Verbatim(text) => put_bulk(out, text.get(4..).unwrap_or_default()),
            Frame::Map(pairs) => {
                put_map_len(out, pairs.len(), protocol);
                for (k, v) in pairs {
                    k.encode(out, protocol);
                    v.encode(out, protocol);
                }
            }
        }
    }

    /// The bytes of a simple or bulk string (or verbatim text), else `None`.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Frame::Simple(b) | Frame::Bulk(b) => Some(b),
            _ => None,
        }
    }

    /// The message of an error reply (`-...` or RESP3 `!...`), else `None`.
    pub fn as_error(&self) -> Option<&Bytes> {
        match self {
            Frame::Error(b) | Frame::BulkError(b) => Some(b),
            _ => None,
        }
    }
}

fn put_line(out: &mut BytesMut, kind: u8, text: &[u8]) {
    out.put_u8(kind);
    out.put_slice(text);
    out.put_slice(b"\r\n");
}

fn put_items(out: &mut BytesMut, kind: u8, items: &[Frame], protocol: Protocol) {
    put_len(out, kind, items.len());
    for item in items {
        item.encode(out, protocol);
    }
}

impl fmt::Display for Frame {
    /// A short human-readable rendering (redis-cli style), for messages and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Simple(s) | Frame::Double(s) | Frame::BigNumber(s) | Frame::Verbatim(s) => {
                write!(f, "{}", String::from_utf8_lossy(s))
            }
            Frame::Error(s) | Frame::BulkError(s) => {
                write!(f, "(error) {}", String::from_utf8_lossy(s))
            }
            Frame::Integer(i) => write!(f, "(integer) {i}"),
            Frame::Bulk(b) => write!(f, "{:?}", String::from_utf8_lossy(b)),
            Frame::Null => write!(f, "(nil)"),
            Frame::Boolean(b) => write!(f, "({b})"),
            Frame::Array(items) | Frame::Set(items) | Frame::Push(items) => {
                write!(f, "[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{item}")?;
                }
                write!(f, "]")
            }
            Frame::Map(pairs) => {
                write!(f, "{{")?;
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                write!(f, "}}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        let mut buf = BytesMut::from(bytes);
        decode(&mut buf, &Limits::DEFAULT)
    }

    #[test]
    fn simple_types_parse() {
        assert_eq!(
            decode_all(b"+OK\r\n"),
            Ok(Some(Frame::Simple(Bytes::from_static(b"OK"))))
        );
        assert_eq!(decode_all(b":-42\r\n"), Ok(Some(Frame::Integer(-42))));
        assert_eq!(decode_all(b"$-1\r\n"), Ok(Some(Frame::Null)));
        assert_eq!(decode_all(b"*-1\r\n"), Ok(Some(Frame::Null)));
        assert_eq!(decode_all(b"_\r\n"), Ok(Some(Frame::Null)));
        assert_eq!(decode_all(b"#t\r\n"), Ok(Some(Frame::Boolean(true))));
        assert_eq!(
            decode_all(b"$0\r\n\r\n"),
            Ok(Some(Frame::Bulk(Bytes::new())))
        );
        assert_eq!(
            decode_all(b"%1\r\n+a\r\n:1\r\n"),
            Ok(Some(Frame::Map(vec![(
                Frame::Simple(Bytes::from_static(b"a")),
                Frame::Integer(1)
            )])))
        );
        // An attribute is skipped; the frame it decorates is returned.
        assert_eq!(
            decode_all(b"|1\r\n+k\r\n+v\r\n:7\r\n"),
            Ok(Some(Frame::Integer(7)))
        );
    }

    #[test]
    fn partial_frames_are_incomplete_not_errors() {
        let whole = b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n";
        for cut in 0..whole.len() {
            assert_eq!(
                check(&whole[..cut], &Limits::DEFAULT),
                Ok(None),
                "cut at {cut}"
            );
        }
        assert_eq!(check(whole, &Limits::DEFAULT), Ok(Some(whole.len())));
    }

    #[test]
    fn integers_are_strict() {
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"9223372036854775808"), None);
        for bad in [&b""[..], b"-", b"+1", b"1 ", b"0x1", b"--1"] {
            assert_eq!(parse_i64(bad), None, "{bad:?}");
        }
        assert_eq!(
            decode_all(b":12a\r\n"),
            Err(ProtocolError::InvalidInteger(0))
        );
    }

    #[test]
    fn caps_are_enforced_before_waiting_for_data() {
        let limits = Limits {
            bulk_bytes_max: 10,
            array_len_max: 3,
            depth_max: 2,
            inline_bytes_max: 8,
        };
        assert_eq!(
            check(b"$11\r\n", &limits),
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(check(b"$10\r\n", &limits), Ok(None));
        assert_eq!(
            check(b"*4\r\n", &limits),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        assert_eq!(
            check(b"%2\r\n", &limits),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        assert_eq!(
            check(b"*1\r\n*1\r\n*1\r\n", &limits),
            Err(ProtocolError::TooDeep(2))
        );
        assert_eq!(
            check(b"+123456789", &limits),
            Err(ProtocolError::InlineTooBig)
        );
        assert_eq!(
            check(b"$99999999999999999999999999999999999", &limits),
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(
            check(b"$-2\r\n", &limits),
            Err(ProtocolError::InvalidBulkLength)
        );
        let mut args = Vec::new();
        let mut buf = BytesMut::from(&b"GET 123456789"[..]);
        assert_eq!(
            decode_request(&mut buf, &limits, &mut args),
            Err(ProtocolError::InlineTooBig)
        );
    }

    #[test]
    fn garbage_is_a_protocol_error_worded_as_redis() {
        assert_eq!(
            decode_all(b"?x\r\n"),
            Err(ProtocolError::InvalidType(b'?', 0))
        );
        assert_eq!(
            decode_all(b"$3\r\nabcd\r\n"),
            Err(ProtocolError::ExpectedCrlf(7))
        );
        let mut args = Vec::new();
        let mut buf = BytesMut::from(&b"*1\r\n:1\r\n"[..]);
        let err = decode_request(&mut buf, &Limits::DEFAULT, &mut args).unwrap_err();
        assert_eq!(err.to_string(), "expected '$', got ':'");
        let mut buf = BytesMut::from(&b"*x\r\n"[..]);
        let err = decode_request(&mut buf, &Limits::DEFAULT, &mut args).unwrap_err();
        assert_eq!(err.to_string(), "invalid multibulk length");
    }

    #[test]
    fn requests_are_slices_of_the_read_buffer() {
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\n*1\r\n$4\r\nPI"[..]);
        let base = buf.as_ptr() as usize;
        let mut args = Vec::new();
        assert_eq!(
            decode_request(&mut buf, &Limits::DEFAULT, &mut args),
            Ok(true)
        );
        assert_eq!(
            args,
            vec![Bytes::from_static(b"GET"), Bytes::from_static(b"hello")]
        );
        // Zero copy: the argument points into the original allocation.
        assert_eq!(args[1].as_ptr() as usize, base + 17);
        assert_eq!(
            decode_request(&mut buf, &Limits::DEFAULT, &mut args),
            Ok(false)
        );
        buf.extend_from_slice(b"NG\r\n");
        assert_eq!(
            decode_request(&mut buf, &Limits::DEFAULT, &mut args),
            Ok(true)
        );
        assert_eq!(args, vec![Bytes::from_static(b"PING")]);
        assert!(buf.is_empty());
    }

    #[test]
    fn inline_commands_split_like_redis() {
        let mut args = Vec::new();
        let mut buf = BytesMut::from(&b"\r\n  set k \"a b\\x41\\n\" 'it\\'s'\r\nPING\n"[..]);
        assert_eq!(
            decode_request(&mut buf, &Limits::DEFAULT, &mut args),
            Ok(true)
        );
        let want: Vec<&[u8]> = vec![b"set", b"k", b"a bA\n", b"it's"];
        assert_eq!(args, want);
        assert_eq!(
            decode_request(&mut buf, &Limits::DEFAULT, &mut args),
            Ok(true)
        );
        assert_eq!(args, vec![Bytes::from_static(b"PING")]);
        let mut buf = BytesMut::from(&b"set k \"abc\n"[..]);
        assert_eq!(
            decode_request(&mut buf, &Limits::DEFAULT, &mut args),
            Err(ProtocolError::UnbalancedQuotes)
        );
        let mut buf = BytesMut::from(&b"set k \"abc\"d\n"[..]);
        assert_eq!(
            decode_request(&mut buf, &Limits::DEFAULT, &mut args),
            Err(ProtocolError::UnbalancedQuotes)
        );
    }

    #[test]
    fn encoders_write_exact_bytes() {
        let mut out = BytesMut::new();
        put_integer(&mut out, i64::MIN);
        put_integer(&mut out, 0);
        put_bulk(&mut out, b"hi");
        put_null(&mut out, Protocol::Resp2);
        put_null(&mut out, Protocol::Resp3);
        put_error(&mut out, b"ERR bad\r\nthing");
        put_request(&mut out, &[b"GET", b"k"]);
        assert_eq!(
            &out[..],
            &b":-9223372036854775808\r\n:0\r\n$2\r\nhi\r\n$-1\r\n_\r\n-ERR bad  thing\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"[..]
        );
    }
}
