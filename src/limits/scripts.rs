//! The Lua scripts the shared counters run in Redis: each request is checked and counted in
//! one call (or served from a lease, see `lease.rs`), ended in one call that nothing waits
//! for, and its slots and reservations kept alive by a heartbeat; and the keys and
//! arguments they are called with.

use super::lease::{Counter, Return};
use super::{Dimension, Scope};

/// Checks every charge, then counts all of them or none. ARGV: one per charge, seven fields
/// split by spaces (one argument each cost the gateway an allocation): kind (`r` rate,
/// `c` slot, `s` budget), limit, amount, window (ms) or slot and reservation TTL (ms),
/// slot or reservation id, a budget's base (its spend if the counter is missing, set even
/// for a request then refused), and the
/// lease wanted beyond the amount (0: none). Returns `{0, mark..., figure..., lease...,
/// left...}` (a rate's mark is its window and its figure the count it now holds; a
/// budget's figure is its spend before this request; a lease is what was granted beyond
/// the amount; left is what remains of a rate's window, ms) or `{failed index, retry
/// after ms, spend}`.
///
/// A lease is granted only when the room left after it is at least twice its size, and a
/// rate's only with 200 ms or more left in its window: near a limit every request is
/// counted on its own.
///
/// Slots and budgets are one hash per counter: a field `r:ID` = `AMOUNT:EXPIRES` per
/// reservation (a request's slot or budget estimate, or a lease of several), and for a
/// budget `s`, what was spent in the period. Expired reservations (their instance died)
/// are dropped when read.
pub(super) const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local function fields(i)
  return string.match(ARGV[i], '^(%a) (%d+) (%d+) (%d+) (%d+) (%d+) (%d+)$')
end
local function window(key, win)
  local h = redis.call('HMGET', key, 'w', 'c', 'p')
  local w = math.floor(now / win)
  local sw, c, p = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if sw ~= w then
    if sw == w - 1 then p = c else p = 0 end
    c = 0
  end
  return w, c, p, sw ~= w
end
local function holders(key)
  local h = redis.call('HGETALL', key)
  local spent, held = nil, 0
  for j = 1, #h, 2 do
    if h[j] == 's' then
      spent = tonumber(h[j + 1])
    else
      local amount, expires = string.match(h[j + 1], '^(%d+):(%d+)$')
      if amount == nil or tonumber(expires) <= now then
        redis.call('HDEL', key, h[j])
      else
        held = held + tonumber(amount)
      end
    end
  end
  return spent, held
end
local spent, used, windows = {}, {}, {}
for i = 1, n do
  local kind, limit, amount, span, _, base = fields(i)
  limit, amount, span = tonumber(limit), tonumber(amount), tonumber(span)
  if kind == 'r' then
    local left = span - (now % span)
    if amount > limit then return {i, left, 0} end
    local w, c, p, rolled = window(KEYS[i], span)
    windows[i] = {w, c, p, rolled}
    used[i] = p * (1 - (now % span) / span) + c
    if used[i] + amount > limit then return {i, left, 0} end
  else
    local s, held = holders(KEYS[i])
    if kind == 'c' then
      if held + amount > limit then return {i, 1000, 0} end
      used[i] = held
    else
      if s == nil then
        -- A missing counter (Redis restarted or was flushed) starts at the caller's
        -- figure of the spend, even for a request then refused: what this instance
        -- counted while Redis was away reaches the others.
        s = tonumber(base)
        redis.call('HSET', KEYS[i], 's', s)
        redis.call('PEXPIRE', KEYS[i], BUDGET_TTL)
      end
      spent[i] = s
      if s + held + amount > limit then return {i, 0, s} end
      used[i] = s + held
    end
  end
end
local out = {0}
for i = 1, n do
  local kind, limit, amount, span, id, base, extra = fields(i)
  limit, amount, span, extra = tonumber(limit), tonumber(amount), tonumber(span), tonumber(extra)
  local left = 0
  if kind == 'r' then left = span - (now % span) end
  if used[i] + amount + 2 * extra > limit or (kind == 'r' and left < 200) then extra = 0 end
  local take = amount + extra
  if kind == 'r' then
    local w, c, p, rolled = unpack(windows[i])
    redis.call('HSET', KEYS[i], 'w', w, 'c', c + take, 'p', p)
    -- Two windows from the start of the window in use: a use in the next one rolls the
    -- window and pushes it again.
    if rolled then redis.call('PEXPIRE', KEYS[i], span * 2) end
    out[i + 1] = w
    out[n + i + 1] = math.ceil(used[i] + take)
  else
    redis.call('HSET', KEYS[i], 'r:' .. id, string.format('%d:%d', take, now + span))
    -- Writes cost the most in a script: the expiry is pushed only when it is near.
    if kind == 'c' and redis.call('PTTL', KEYS[i]) < span then
      redis.call('PEXPIRE', KEYS[i], span * 2)
    end
    out[i + 1] = 0
    out[n + i + 1] = spent[i] or 0
  end
  out[2 * n + i + 1] = extra
  out[3 * n + i + 1] = left
end
return out
"#;

/// How long a budget's counter outlives its last use (longer than any period: a new
/// period or a reset is a new counter, and the old one expires).
const BUDGET_TTL_MS: u64 = 35 * 24 * 3600 * 1000;

/// Ends requests and leases, or takes back a refused request, in one call. ARGV: one per
/// key, five fields split by spaces (`-` for none): kind and four values.
/// - `t` (a rate): window, delta: adds delta to the count of that window while it is the
///   current or the previous one (a lease's unused units come back after the window
///   rolled).
/// - `h` (a slot or budget reservation): id, amount, cost, base: sets the reservation to
///   `amount` (0 drops it) and adds `cost` (`-`: nothing) to the spend, which starts at
///   `base` when missing. Spend counted in this process while Redis was away has no base
///   (`-`): it is added to a counter that exists, and a missing one starts from the
///   figure of the next instance to reserve, which includes it (a base from before the
///   outage would undercount).
pub(super) const FINISH: &str = r#"
for i = 1, #KEYS do
  local kind, a, b, c, d = string.match(ARGV[i], '^(%a) (%S+) (%S+) (%S+) (%S+)$')
  if kind == 't' then
    local h = redis.call('HMGET', KEYS[i], 'w', 'c', 'p')
    local w, field, v = tonumber(h[1]), nil, 0
    if w == tonumber(a) then
      field, v = 'c', tonumber(h[2]) or 0
    elseif w == tonumber(a) + 1 then
      field, v = 'p', tonumber(h[3]) or 0
    end
    if field then
      v = v + tonumber(b)
      if v < 0 then v = 0 end
      redis.call('HSET', KEYS[i], field, v)
    end
  elseif kind == 'h' then
    local f = 'r:' .. a
    if b == '0' then
      redis.call('HDEL', KEYS[i], f)
    else
      local v = redis.call('HGET', KEYS[i], f)
      if v then redis.call('HSET', KEYS[i], f, b .. string.match(v, '(:%d+)$')) end
    end
    if c ~= '-' then
      if d ~= '-' then redis.call('HSETNX', KEYS[i], 's', d) end
      if redis.call('HEXISTS', KEYS[i], 's') == 1 then
        redis.call('HINCRBY', KEYS[i], 's', c)
        redis.call('PEXPIRE', KEYS[i], BUDGET_TTL)
      end
    end
  end
end
return 0
"#;

/// Pushes the expiry of the slots, budget reservations and leases named in ARGV (after
/// the TTL in ARGV[1]) forward, when they are still held, and that of their counter.
pub(super) const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local until_ = string.format('%d', now + ttl)
for i = 1, #KEYS do
  local f = 'r:' .. ARGV[i + 1]
  local v = redis.call('HGET', KEYS[i], f)
  if v then
    redis.call('HSET', KEYS[i], f, string.match(v, '^(%d+):') .. ':' .. until_)
    local left = redis.call('PTTL', KEYS[i])
    if left >= 0 and left < ttl * 2 then redis.call('PEXPIRE', KEYS[i], ttl * 2) end
  end
end
return 0
"#;

/// A script with its constants filled in.
pub(super) fn script(text: &str) -> redis::Script {
    redis::Script::new(&text.replace("BUDGET_TTL", &BUDGET_TTL_MS.to_string()))
}

/// The Redis key of a counter, written only for a call to Redis.
pub(super) fn key_name((scope, key, dimension): Counter) -> String {
    counter_name(scope, key, dimension)
}

/// The Redis key of one counter: `tollgate:{tollgate-limits}:SCOPE:KEY:DIMENSION`, the
/// key as 16 hex digits. Written by hand: a request names up to ten counters, and
/// `format!` cost a thousand instructions each.
pub(super) fn counter_name(scope: Scope, key: u64, dimension: Dimension) -> String {
    const PREFIX: &str = "tollgate:{tollgate-limits}:";
    let dim = match dimension {
        Dimension::Rps => "rps",
        Dimension::Rpm => "rpm",
        Dimension::Tpm => "tpm",
        Dimension::Concurrency => "inflight",
        Dimension::Spend => "spend",
    };
    let mut name = String::with_capacity(PREFIX.len() + 6 + 1 + 16 + 1 + 8);
    name.push_str(PREFIX);
    name.push_str(scope.as_str());
    name.push(':');
    crate::spec::text::push_hex(&mut name, key, 16);
    name.push(':');
    name.push_str(dim);
    name
}

/// One script argument: a charge's fields split by spaces, numbers in decimal, `-` for none
/// (the scripts' `ARGV` layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    Word(&'static str),
    Number(u64),
    Signed(i128),
    None,
}

pub(super) fn argument(fields: &[Field]) -> String {
    use crate::spec::text::{push_i128, push_u64};
    let mut out = String::with_capacity(fields.len() * 8);
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        match *f {
            Field::Word(w) => out.push_str(w),
            Field::Number(n) => push_u64(&mut out, n),
            Field::Signed(n) => push_i128(&mut out, n),
            Field::None => out.push('-'),
        }
    }
    out
}

pub(super) fn window_ms(d: Dimension) -> u64 {
    match d {
        Dimension::Rps => 1_000,
        _ => 60_000,
    }
}

/// One FINISH item (a key and its argument) of what a request or a lease gives back.
pub(super) fn finish_item(r: &Return) -> (String, String) {
    match *r {
        Return::Rate {
            counter,
            window,
            delta,
        } => {
            let args = [
                Field::Word("t"),
                Field::Number(window),
                Field::Signed(delta),
                Field::None,
                Field::None,
            ];
            (key_name(counter), argument(&args))
        }
        Return::Held {
            counter,
            id,
            amount,
            cost,
            base,
            ..
        } => {
            let cost = cost.map(|v| v.min(super::MAX_SPEND));
            let args = [
                Field::Word("h"),
                Field::Number(id),
                Field::Number(amount),
                cost.map_or(Field::None, Field::Number),
                if id == super::COUNTED_HERE {
                    Field::None
                } else {
                    Field::Number(base)
                },
            ];
            (key_name(counter), argument(&args))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_names_are_the_documented_keys() {
        for (scope, key, dimension, dim) in [
            (Scope::Key, 0xab, Dimension::Rpm, "rpm"),
            (Scope::Ip, u64::MAX, Dimension::Concurrency, "inflight"),
            (
                Scope::Team,
                0x0123_4567_89ab_cdef,
                Dimension::Spend,
                "spend",
            ),
        ] {
            assert_eq!(
                counter_name(scope, key, dimension),
                format!(
                    "tollgate:{{tollgate-limits}}:{}:{key:016x}:{dim}",
                    scope.as_str()
                )
            );
        }
    }

    #[test]
    fn arguments_are_fields_split_by_spaces() {
        let fields = [
            Field::Word("s"),
            Field::Number(42),
            Field::Signed(-7),
            Field::None,
        ];
        assert_eq!(argument(&fields), "s 42 -7 -");
    }
}
