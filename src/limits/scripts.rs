//! The Lua scripts the shared counters run in Redis: each request is checked and counted in
//! one call, ended in one call that nothing waits for, and its slots kept alive by a
//! heartbeat.

/// Checks every charge, then counts all of them or none. ARGV: one per charge, six fields
/// split by spaces (one argument each cost the gateway an allocation): kind (`r` rate,
/// `c` slot, `s` budget), limit, amount, window (ms) or slot and reservation TTL (ms),
/// slot or reservation id, and a budget's base (its spend if the counter is missing). Returns `{0, mark..., figure...}` (a rate's mark is its window and its figure
/// the count it now holds; a budget's figure is its spend before this request) or
/// `{failed index, retry after ms, spend}`.
///
/// A budget is one hash: `s`, what was spent in the period, and a field `r:ID` =
/// `AMOUNT:EXPIRES` per reservation in flight. Expired reservations (their instance died)
/// are dropped when read.
pub(super) const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local function fields(i)
  return string.match(ARGV[i], '^(%a) (%d+) (%d+) (%d+) (%d+) (%d+)$')
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
local function spend(key)
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
local spent, windows = {}, {}
for i = 1, n do
  local kind, limit, amount, span, _, base = fields(i)
  limit, amount, span = tonumber(limit), tonumber(amount), tonumber(span)
  if kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    if redis.call('ZCARD', KEYS[i]) + 1 > limit then return {i, 1000, 0} end
  elseif kind == 's' then
    local s, held = spend(KEYS[i])
    spent[i] = s
    if s == nil then s = tonumber(base) end
    if s + held + amount > limit then return {i, 0, s} end
  else
    local left = span - (now % span)
    if amount > limit then return {i, left, 0} end
    local w, c, p, rolled = window(KEYS[i], span)
    windows[i] = {w, c, p, rolled}
    local frac = (now % span) / span
    if p * (1 - frac) + c + amount > limit then return {i, left, 0} end
  end
end
local out = {0}
for i = 1, n do
  local kind, _, amount_text, span, id, base = fields(i)
  local amount = tonumber(amount_text)
  span = tonumber(span)
  if kind == 'c' then
    redis.call('ZADD', KEYS[i], now + span, id)
    -- Writes cost the most in a script: the expiry is pushed only when it is near.
    if redis.call('PTTL', KEYS[i]) < span then redis.call('PEXPIRE', KEYS[i], span * 2) end
    out[i + 1] = 0
    out[n + i + 1] = 0
  elseif kind == 's' then
    if spent[i] == nil then
      redis.call('HSET', KEYS[i], 's', base)
      redis.call('PEXPIRE', KEYS[i], BUDGET_TTL)
      spent[i] = tonumber(base)
    end
    redis.call('HSET', KEYS[i], 'r:' .. id, amount_text .. ':' .. string.format('%d', now + span))
    out[i + 1] = 0
    out[n + i + 1] = spent[i]
  else
    local w, c, p, rolled = unpack(windows[i])
    redis.call('HSET', KEYS[i], 'w', w, 'c', c + amount, 'p', p)
    -- Two windows from the start of the window in use: a use in the next one rolls the
    -- window and pushes it again.
    if rolled then redis.call('PEXPIRE', KEYS[i], span * 2) end
    out[i + 1] = w
    local frac = (now % span) / span
    out[n + i + 1] = math.ceil(p * (1 - frac) + c + amount)
  end
end
return out
"#;

/// How long a budget's counter outlives its last use (longer than any period: a new
/// period or a reset is a new counter, and the old one expires).
const BUDGET_TTL_MS: u64 = 35 * 24 * 3600 * 1000;

/// Ends a request, or takes back a refused one, in one call. ARGV: one per key, four fields
/// split by spaces (`-` for none): kind and three numbers. `t` (a rate): window, delta: adds delta to the count when the window is
/// still that one. `c` (a slot): id: gives it back. `s` (a budget): id, cost (`-` when
/// nothing is to be charged), base: drops the reservation and adds the cost to the spend.
pub(super) const FINISH: &str = r#"
for i = 1, #KEYS do
  local kind, x, y, z = string.match(ARGV[i], '^(%a) (%S+) (%S+) (%S+)$')
  if kind == 't' then
    if redis.call('HGET', KEYS[i], 'w') == x then
      local c = tonumber(redis.call('HGET', KEYS[i], 'c')) + tonumber(y)
      if c < 0 then c = 0 end
      redis.call('HSET', KEYS[i], 'c', c)
    end
  elseif kind == 'c' then
    redis.call('ZREM', KEYS[i], x)
  else
    redis.call('HDEL', KEYS[i], 'r:' .. x)
    if y ~= '-' then
      redis.call('HSETNX', KEYS[i], 's', z)
      redis.call('HINCRBY', KEYS[i], 's', y)
      redis.call('PEXPIRE', KEYS[i], BUDGET_TTL)
    end
  end
end
return 0
"#;

/// Pushes the expiry of the slots and budget reservations named in ARGV (after the TTL in
/// ARGV[1]) forward, when they are still held.
pub(super) const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ = string.format('%d', now + tonumber(ARGV[1]))
for i = 1, #KEYS do
  local id = ARGV[i + 1]
  if redis.call('TYPE', KEYS[i]).ok == 'hash' then
    local v = redis.call('HGET', KEYS[i], 'r:' .. id)
    if v then
      redis.call('HSET', KEYS[i], 'r:' .. id, string.match(v, '^(%d+):') .. ':' .. until_)
    end
  else
    redis.call('ZADD', KEYS[i], 'XX', until_, id)
  end
end
return 0
"#;

/// A script with its constants filled in.
pub(super) fn script(text: &str) -> redis::Script {
    redis::Script::new(&text.replace("BUDGET_TTL", &BUDGET_TTL_MS.to_string()))
}
