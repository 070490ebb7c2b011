//! The Lua scripts: every state change that touches more than one key runs as one script, so
//! it is atomic. Times come from the Redis server clock (`TIME`), so workers and operator
//! never compare clocks of different machines.
//!
//! Every key a script is given is declared in `KEYS`, except the job hashes that the claim,
//! leave and take-over paths reach through the uid of a stream entry they have just read (the
//! entry is not known before the script runs). Those keys are built from the pool's job-key
//! prefix (`Keys::job_prefix`, an `ARGV`) and so lie under the pool's own prefix too; Redis
//! checks ACL key permissions on every `redis.call`, so a pool's user can reach no other key
//! through a script either. The protocol needs a single Redis (primary + replicas), not Redis
//! Cluster.

use std::sync::LazyLock;

use redis::Script;

/// Helpers shared by all scripts.
const PRELUDE: &str = r#"
local GROUP = 'workers'
local TERMINAL = {succeeded = true, failed = true, cancelled = true}
local CLAIMABLE = {queued = true, running = true}

local function now_ms()
  local t = redis.call('TIME')
  return string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end

local function ackdel(stream, id)
  if stream and stream ~= '' and id and id ~= '' then
    redis.pcall('XACK', stream, GROUP, id)
    redis.call('XDEL', stream, id)
  end
end

local function pairs_to_table(list)
  local t = {}
  if type(list) ~= 'table' then return t end
  for i = 1, #list, 2 do t[list[i]] = list[i + 1] end
  return t
end

local function load_job(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  return pairs_to_table(flat)
end

local function add_entry(stream, uid, job, attempt)
  return redis.call('XADD', stream, '*', 'uid', uid, 'namespace', job.namespace or '',
    'name', job.name or '', 'attempt', tostring(attempt), 'spec', job.spec or '')
end

local function emit(events, maxlen, kind, uid, job, attempt, worker, ts, payload)
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*',
    'type', kind, 'uid', uid,
    'namespace', job.namespace or '', 'name', job.name or '', 'pool', job.pool or '',
    'attempt', tostring(attempt), 'worker', worker or '', 'ts', ts, 'payload', payload or '')
end

local function error_payload(reason, message)
  return cjson.encode({reason = reason, message = message})
end

local function set_registry(reg, worker, uid, ts)
  local job = 'null'
  if uid and uid ~= '' then job = cjson.encode(uid) end
  redis.call('HSET', reg, worker, '{"seen":' .. ts .. ',"job":' .. job .. '}')
end

-- Marks `worker` idle in the registry if it is recorded as running `uid` (it may be dead).
local function clear_registry_job(reg, worker, uid)
  if not worker or worker == '' then return end
  local cur = redis.call('HGET', reg, worker)
  if cur then
    local ok, v = pcall(cjson.decode, cur)
    if ok and type(v) == 'table' and v.job == uid then
      local seen = string.format('%.0f', tonumber(v.seen) or 0)
      redis.call('HSET', reg, worker, '{"seen":' .. seen .. ',"job":null}')
    end
  end
end

-- Terminal state: no current entry any more, the hash expires after the ttl (ms).
local function finish(jobkey, state, ts, ttl)
  redis.call('HSET', jobkey, 'state', state, 'finished_at', ts)
  redis.call('HDEL', jobkey, 'entry', 'stream')
  if tonumber(ttl) > 0 then redis.call('PEXPIRE', jobkey, ttl) end
end

local function finish_cancelled(ctx, jobkey, uid, job, stream, id, attempt, message, ts)
  ackdel(stream, id)
  redis.call('HSET', jobkey, 'reason', 'Cancelled', 'message', message)
  finish(jobkey, 'cancelled', ts, ctx.ttl)
  emit(ctx.events, ctx.events_maxlen, 'cancelled', uid, job, attempt, job.worker, ts,
    error_payload('Cancelled', message))
end

local function dead_letter(ctx, uid, job, attempt, message, last_reason, ts)
  redis.call('XADD', ctx.dead, 'MAXLEN', '~', ctx.dead_maxlen, '*',
    'uid', uid, 'namespace', job.namespace or '', 'name', job.name or '',
    'pool', job.pool or '', 'priority', job.priority or 'normal',
    'attempt', tostring(attempt), 'max_attempts', job.max_attempts or '',
    'worker', job.worker or '', 'reason', 'AttemptsExhausted', 'message', message,
    'last_reason', last_reason, 'spec', job.spec or '', 'ts', ts)
end

-- Claim bookkeeping for an entry this worker just got (fresh delivery or reclaim).
-- Returns the claim as an array, or nil when the entry was not a job to run (orphan,
-- stale, not in a claimable state, cancelled, or out of attempts: each is acked and deleted,
-- with its event).
local function take(ctx, stream, id, uid)
  if not uid or uid == '' then ackdel(stream, id); return nil end
  local jobkey = ctx.job_prefix .. uid
  local job = load_job(jobkey)
  if not job or TERMINAL[job.state] or job.entry ~= id or job.stream ~= stream then
    ackdel(stream, id)
    return nil
  end
  local ts = now_ms()
  local prev = job.worker or ''
  local used = tonumber(job.attempt) or 0
  if not CLAIMABLE[job.state] then
    -- Not a job that can run (no state, or one this version does not know): it fails with
    -- the reason instead of running.
    local msg = 'the job hash has no state'
    if job.state and job.state ~= '' then
      msg = 'the job hash has state ' .. job.state .. ', which is not queued or running'
    end
    ackdel(stream, id)
    redis.call('HSET', jobkey, 'reason', 'InvalidInput', 'message', msg)
    finish(jobkey, 'failed', ts, ctx.ttl)
    clear_registry_job(ctx.registry, prev, uid)
    emit(ctx.events, ctx.events_maxlen, 'failed', uid, job, used, prev, ts,
      error_payload('InvalidInput', msg))
    return nil
  end
  if job.cancel == '1' then
    finish_cancelled(ctx, jobkey, uid, job, stream, id, used, 'cancelled while its worker was gone', ts)
    clear_registry_job(ctx.registry, prev, uid)
    return nil
  end
  local attempt = used + 1
  local max = tonumber(job.max_attempts) or 1
  if attempt > max then
    local last_reason = job.reason or 'Unknown'
    local last_message = job.message or ''
    if job.state == 'running' then
      last_reason = 'WorkerLost'
      last_message = 'worker ' .. prev .. ' stopped heartbeating'
    end
    local msg = string.format('%s: %s (%d of %d attempts used)', last_reason, last_message, used, max)
    ackdel(stream, id)
    dead_letter(ctx, uid, job, used, msg, last_reason, ts)
    redis.call('HSET', jobkey, 'reason', 'AttemptsExhausted', 'message', msg)
    finish(jobkey, 'failed', ts, ctx.ttl)
    clear_registry_job(ctx.registry, prev, uid)
    emit(ctx.events, ctx.events_maxlen, 'failed', uid, job, used, prev, ts,
      error_payload('AttemptsExhausted', msg))
    return nil
  end
  redis.call('HSET', jobkey, 'state', 'running', 'worker', ctx.worker,
    'attempt', tostring(attempt), 'claimed_at', ts, 'heartbeat_at', ts)
  redis.call('HDEL', jobkey, 'stage', 'step', 'total_steps')
  if prev ~= ctx.worker then clear_registry_job(ctx.registry, prev, uid) end
  set_registry(ctx.registry, ctx.worker, uid, ts)
  emit(ctx.events, ctx.events_maxlen, 'claimed', uid, job, attempt, ctx.worker, ts, '')
  return {'claimed', uid, stream, id, tostring(attempt), job.max_attempts or '1',
    job.namespace or '', job.name or '', job.priority or 'normal', job.spec or '', prev}
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// KEYS: job, stream, pools. ARGV: uid, namespace, name, pool, priority, max_attempts, spec.
/// Reply: {'created'|'exists', state, entry id or ''}.
pub(crate) static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local st = redis.call('HMGET', KEYS[1], 'state', 'entry')
if st[1] then return {'exists', st[1], st[2] or ''} end
redis.pcall('XGROUP', 'CREATE', KEYS[2], GROUP, '0', 'MKSTREAM')
local ts = now_ms()
local id = redis.call('XADD', KEYS[2], '*', 'uid', ARGV[1], 'namespace', ARGV[2],
  'name', ARGV[3], 'attempt', '0', 'spec', ARGV[7])
redis.call('HSET', KEYS[1], 'state', 'queued', 'namespace', ARGV[2], 'name', ARGV[3],
  'pool', ARGV[4], 'priority', ARGV[5], 'attempt', '0', 'max_attempts', ARGV[6],
  'stream', KEYS[2], 'entry', id, 'spec', ARGV[7], 'enqueued_at', ts, 'worker', '')
redis.call('SADD', KEYS[3], ARGV[4])
return {'created', 'queued', id}
"#,
    )
});

/// KEYS: high stream, normal stream. Creates both consumer groups (a worker's session start).
pub(crate) static ENSURE_STREAMS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
redis.pcall('XGROUP', 'CREATE', KEYS[1], GROUP, '0', 'MKSTREAM')
redis.pcall('XGROUP', 'CREATE', KEYS[2], GROUP, '0', 'MKSTREAM')
return 1
"#,
    )
});

const CLAIM_CTX: &str = r#"
local ctx = {job_prefix = ARGV[1], worker = ARGV[2], events = KEYS[3], dead = KEYS[4],
  registry = KEYS[5], events_maxlen = ARGV[3], dead_maxlen = ARGV[4], ttl = ARGV[5]}
"#;

/// Non-blocking claim: the worker's own pending entries (after a restart, when asked), then
/// per stream (high first) entries idle longer than the lease (XAUTOCLAIM; only once the server
/// has been up for a lease), then new entries.
/// KEYS: high, normal, events, dead, registry, server.
/// ARGV: job-key prefix, worker, events maxlen, dead maxlen, ttl ms, lease ms, own-first ('1'|'0').
/// Reply: the claim array of `take`, or {'none'}.
pub(crate) static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    script(&format!(
        r#"{CLAIM_CTX}
set_registry(ctx.registry, ctx.worker, '', now_ms())
local streams = {{KEYS[1], KEYS[2]}}
if ARGV[7] == '1' then
  for _, s in ipairs(streams) do
    local p = redis.call('XPENDING', s, GROUP, '-', '+', 100, ctx.worker)
    for _, e in ipairs(p) do
      local r = redis.call('XRANGE', s, e[1], e[1])
      local uid = nil
      if r[1] then uid = pairs_to_table(r[1][2]).uid end
      local res = take(ctx, s, e[1], uid)
      if res then return res end
    end
  end
end
-- Idle times survive a restart of Redis (the pending lists are persisted), so right after one
-- every entry looks abandoned since the outage began. Its worker may well be alive, have
-- finished and be retrying its report: nothing is taken over until this server has been up
-- for a whole lease, which gives every live worker that lease to heartbeat or report again.
-- The server's run id changes with every start; `since` is when a claim first saw this one
-- (no earlier than the start itself).
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') or ''
local seen = redis.call('HMGET', KEYS[6], 'run_id', 'since')
local since = tonumber(seen[2])
local now = tonumber(now_ms())
if seen[1] ~= run or not since then
  since = now
  redis.call('HSET', KEYS[6], 'run_id', run, 'since', string.format('%.0f', since))
end
local reclaim = now - since >= tonumber(ARGV[6])
for _, s in ipairs(streams) do
  local cursor = '0-0'
  for round = 1, 64 do
    if not reclaim then break end
    local r = redis.call('XAUTOCLAIM', s, GROUP, ctx.worker, ARGV[6], cursor, 'COUNT', 1)
    cursor = r[1]
    for _, e in ipairs(r[2]) do
      if type(e) == 'table' and e[1] then
        local res = take(ctx, s, e[1], pairs_to_table(e[2]).uid)
        if res then return res end
      end
    end
    if cursor == '0-0' then break end
  end
  for i = 1, 32 do
    local r = redis.call('XREADGROUP', 'GROUP', GROUP, ctx.worker, 'COUNT', 1, 'STREAMS', s, '>')
    if not r then break end
    local e = r[1][2][1]
    local res = take(ctx, s, e[1], pairs_to_table(e[2]).uid)
    if res then return res end
  end
end
return {{'none'}}
"#
    ))
});

/// Bookkeeping for an entry delivered by the worker's blocking read.
/// KEYS: high, normal, events, dead, registry, server (unused).
/// ARGV: job-key prefix, worker, events maxlen, dead maxlen, ttl ms, stream index (1|2), entry id, uid.
pub(crate) static CLAIM_DELIVERED: LazyLock<Script> = LazyLock::new(|| {
    script(&format!(
        r#"{CLAIM_CTX}
local s = KEYS[tonumber(ARGV[6])]
local id = ARGV[7]
local p = redis.call('XPENDING', s, GROUP, id, id, 1, ctx.worker)
if #p == 0 then return {{'none'}} end
local res = take(ctx, s, id, ARGV[8])
if res then return res end
return {{'none'}}
"#
    ))
});

/// Gives back an entry the blocking read delivered but the worker will not run (it got two
/// entries at once): a fresh entry at the end of the same stream, attempt unchanged.
/// KEYS: stream, job. ARGV: (unused), worker, entry id, uid.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id = ARGV[3]
local p = redis.call('XPENDING', KEYS[1], GROUP, id, id, 1, ARGV[2])
if #p == 0 then return {'none'} end
local jobkey = KEYS[2]
local job = load_job(jobkey)
if not job or TERMINAL[job.state] or job.entry ~= id then
  ackdel(KEYS[1], id)
  return {'dropped'}
end
if job.state ~= 'queued' then return {'skipped'} end
local newid = add_entry(KEYS[1], ARGV[4], job, job.attempt or '0')
ackdel(KEYS[1], id)
redis.call('HSET', jobkey, 'entry', newid, 'stream', KEYS[1])
return {'released', newid}
"#,
    )
});

/// KEYS: job, stream, registry. ARGV: uid, worker, entry id.
/// Reply: {'ok'} | {'cancel'} | {'lost'}.
pub(crate) static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local st = redis.call('HMGET', KEYS[1], 'state', 'worker', 'entry', 'cancel')
if st[1] ~= 'running' or st[2] ~= ARGV[2] or st[3] ~= ARGV[3] then return {'lost'} end
local c = redis.call('XCLAIM', KEYS[2], GROUP, ARGV[2], 0, ARGV[3], 'JUSTID')
if #c == 0 then return {'lost'} end
local ts = now_ms()
redis.call('HSET', KEYS[1], 'heartbeat_at', ts)
set_registry(KEYS[3], ARGV[2], ARGV[1], ts)
if st[4] == '1' then return {'cancel'} end
return {'ok'}
"#,
    )
});

/// KEYS: job, events. ARGV: uid, worker, entry id, stage, step, total steps, payload, maxlen.
/// Reply: {'ok'} | {'cancel'} | {'lost'}.
pub(crate) static PROGRESS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local job = load_job(KEYS[1])
if not job or job.state ~= 'running' or job.worker ~= ARGV[2] or job.entry ~= ARGV[3] then
  return {'lost'}
end
redis.call('HSET', KEYS[1], 'stage', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'step', ARGV[5]) else redis.call('HDEL', KEYS[1], 'step') end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'total_steps', ARGV[6]) else redis.call('HDEL', KEYS[1], 'total_steps') end
emit(KEYS[2], ARGV[8], 'progress', ARGV[1], job, job.attempt or '0', ARGV[2], now_ms(), ARGV[7])
if job.cancel == '1' then return {'cancel'} end
return {'ok'}
"#,
    )
});

/// Shared head of the terminal worker calls: KEYS: job, stream, events, dead, registry;
/// ARGV: uid, worker, entry id, events maxlen, dead maxlen, ttl ms, caller's attempt, ...
/// Unknown job → ack the entry, {'notfound'}; finished job → ack the (stale) entry,
/// {'finished', state}; `owned` scripts also answer {'lost'} when another worker holds it.
const TERMINAL_HEAD: &str = r#"
local ctx = {events = KEYS[3], dead = KEYS[4], registry = KEYS[5], events_maxlen = ARGV[4],
  dead_maxlen = ARGV[5], ttl = ARGV[6]}
local uid, worker, entry, stream = ARGV[1], ARGV[2], ARGV[3], KEYS[2]
local job = load_job(KEYS[1])
if not job then ackdel(stream, entry); return {'notfound'} end
if TERMINAL[job.state] then ackdel(stream, entry); return {'finished', job.state} end
local owned = job.state == 'running' and job.worker == worker and job.entry == entry
local ts = now_ms()
"#;

/// Complete: accepted from any worker that ran the job while it is not finished (first
/// result wins); acks this entry and the job's current one.
/// ARGV (after the head): output, caption, prompt, prompt source, timings json, payload json,
/// work json (empty: not counted, the field is removed).
pub(crate) static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    script(&format!(
        r#"{TERMINAL_HEAD}
ackdel(stream, entry)
if job.entry and job.entry ~= entry then ackdel(job.stream, job.entry) end
local holder = job.worker or ''
redis.call('HSET', KEYS[1], 'worker', worker, 'output', ARGV[8], 'caption', ARGV[9],
  'prompt', ARGV[10], 'prompt_source', ARGV[11], 'timings', ARGV[12])
if ARGV[14] and ARGV[14] ~= '' then
  redis.call('HSET', KEYS[1], 'work', ARGV[14])
else
  redis.call('HDEL', KEYS[1], 'work')
end
redis.call('HDEL', KEYS[1], 'reason', 'message')
finish(KEYS[1], 'succeeded', ts, ctx.ttl)
set_registry(ctx.registry, worker, '', ts)
if holder ~= worker then clear_registry_job(ctx.registry, holder, uid) end
emit(ctx.events, ctx.events_maxlen, 'succeeded', uid, job, ARGV[7], worker, ts, ARGV[13])
return {{'done'}}
"#
    ))
});

/// Fail. ARGV (after the head): reason, message, retryable ('1'|'0').
/// Reply: {'requeued', attempt} | {'dead'} | {'set', state} (this call finished it) |
/// {'finished', state} (already finished) | {'lost'} | {'notfound'}.
pub(crate) static FAIL: LazyLock<Script> = LazyLock::new(|| {
    script(&format!(
        r#"{TERMINAL_HEAD}
if not owned then return {{'lost'}} end
local reason, message = ARGV[8], ARGV[9]
local attempt = tonumber(job.attempt) or 0
local max = tonumber(job.max_attempts) or 1
if job.cancel == '1' then
  finish_cancelled(ctx, KEYS[1], uid, job, stream, entry, attempt,
    'cancelled while running (last error ' .. reason .. ': ' .. message .. ')', ts)
  set_registry(ctx.registry, worker, '', ts)
  return {{'set', 'cancelled'}}
end
set_registry(ctx.registry, worker, '', ts)
if ARGV[10] == '1' and attempt < max then
  local newid = add_entry(stream, uid, job, attempt)
  ackdel(stream, entry)
  redis.call('HSET', KEYS[1], 'state', 'queued', 'worker', '', 'entry', newid, 'stream', stream,
    'reason', reason, 'message', message)
  redis.call('HDEL', KEYS[1], 'stage', 'step', 'total_steps')
  emit(ctx.events, ctx.events_maxlen, 'retrying', uid, job, attempt, worker, ts,
    error_payload(reason, message))
  return {{'requeued', tostring(attempt)}}
end
ackdel(stream, entry)
if ARGV[10] == '1' then
  local msg = string.format('%s: %s (%d of %d attempts used)', reason, message, attempt, max)
  dead_letter(ctx, uid, job, attempt, msg, reason, ts)
  redis.call('HSET', KEYS[1], 'reason', 'AttemptsExhausted', 'message', msg)
  finish(KEYS[1], 'failed', ts, ctx.ttl)
  emit(ctx.events, ctx.events_maxlen, 'failed', uid, job, attempt, worker, ts,
    error_payload('AttemptsExhausted', msg))
  return {{'dead'}}
end
redis.call('HSET', KEYS[1], 'reason', reason, 'message', message)
finish(KEYS[1], 'failed', ts, ctx.ttl)
emit(ctx.events, ctx.events_maxlen, 'failed', uid, job, attempt, worker, ts,
  error_payload(reason, message))
return {{'set', 'failed'}}
"#
    ))
});

/// The worker stopped because of a cancel. ARGV (after the head): message.
pub(crate) static CANCELLED: LazyLock<Script> = LazyLock::new(|| {
    script(&format!(
        r#"{TERMINAL_HEAD}
if not owned then return {{'lost'}} end
finish_cancelled(ctx, KEYS[1], uid, job, stream, entry, job.attempt or '0', ARGV[8], ts)
set_registry(ctx.registry, worker, '', ts)
return {{'set', 'cancelled'}}
"#
    ))
});

/// Hand-back of a running job (worker shutting down): a fresh entry at the end of the same
/// stream, the attempt given back. ARGV (after the head): reason, message.
pub(crate) static HAND_BACK: LazyLock<Script> = LazyLock::new(|| {
    script(&format!(
        r#"{TERMINAL_HEAD}
if not owned then return {{'lost'}} end
set_registry(ctx.registry, worker, '', ts)
if job.cancel == '1' then
  finish_cancelled(ctx, KEYS[1], uid, job, stream, entry, job.attempt or '0',
    'cancelled while its worker was shutting down', ts)
  return {{'set', 'cancelled'}}
end
local attempt = math.max((tonumber(job.attempt) or 1) - 1, 0)
local newid = add_entry(stream, uid, job, attempt)
ackdel(stream, entry)
redis.call('HSET', KEYS[1], 'state', 'queued', 'worker', '', 'entry', newid, 'stream', stream,
  'attempt', tostring(attempt))
redis.call('HDEL', KEYS[1], 'stage', 'step', 'total_steps')
emit(ctx.events, ctx.events_maxlen, 'retrying', uid, job, attempt, worker, ts,
  error_payload(ARGV[8], ARGV[9]))
return {{'requeued', tostring(attempt)}}
"#
    ))
});

/// Operator cancel. KEYS: job, events, high, normal. ARGV: uid, events maxlen, ttl ms, message.
/// Reply: {'cancelled'} | {'requested'} | {'finished', state} | {'notfound'}.
/// The hash's `stream` is written by the pool's workers: the operator only touches it when it
/// is one of the pool's own streams (it runs with every key in reach).
pub(crate) static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local job = load_job(KEYS[1])
if not job then return {'notfound'} end
if TERMINAL[job.state] then return {'finished', job.state} end
if job.state == 'queued' then
  local ctx = {events = KEYS[2], events_maxlen = ARGV[2], ttl = ARGV[3]}
  local stream = job.stream
  if stream ~= KEYS[3] and stream ~= KEYS[4] then stream = nil end
  finish_cancelled(ctx, KEYS[1], ARGV[1], job, stream, job.entry, job.attempt or '0', ARGV[4], now_ms())
  return {'cancelled'}
end
redis.call('HSET', KEYS[1], 'cancel', '1')
return {'requested'}
"#,
    )
});

/// KEYS: high, normal. Reply: {len high, pending high, len normal, pending normal}.
pub(crate) static DEPTH: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local out = {}
for i = 1, 2 do
  local len = redis.call('XLEN', KEYS[i])
  local pending = 0
  if len > 0 then
    local p = redis.pcall('XPENDING', KEYS[i], GROUP)
    if type(p) == 'table' and type(p[1]) == 'number' then pending = p[1] end
  end
  out[#out + 1] = len
  out[#out + 1] = pending
end
return out
"#,
    )
});

/// KEYS: high, normal. Reply: flat {stream index, entry id, consumer, idle ms, deliveries, uid}*.
pub(crate) static BUSY: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local out = {}
for i = 1, 2 do
  if redis.call('XLEN', KEYS[i]) > 0 then
    local p = redis.pcall('XPENDING', KEYS[i], GROUP, '-', '+', 10000)
    if type(p) == 'table' and not p.err then
      for _, e in ipairs(p) do
        local r = redis.call('XRANGE', KEYS[i], e[1], e[1])
        local uid = ''
        if r[1] then uid = pairs_to_table(r[1][2]).uid or '' end
        out[#out + 1] = tostring(i)
        out[#out + 1] = e[1]
        out[#out + 1] = e[2]
        out[#out + 1] = tostring(e[3])
        out[#out + 1] = tostring(e[4])
        out[#out + 1] = uid
      end
    end
  end
end
return out
"#,
    )
});

/// KEYS: job, high, normal. Reply: {'notfound'} | {'forgotten', state}.
/// Like cancel, only the pool's own streams are touched.
pub(crate) static FORGET: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local job = load_job(KEYS[1])
if not job then return {'notfound'} end
if not TERMINAL[job.state] and (job.stream == KEYS[2] or job.stream == KEYS[3]) then
  ackdel(job.stream, job.entry)
end
redis.call('DEL', KEYS[1])
return {'forgotten', job.state}
"#,
    )
});

/// KEYS: registry, high, normal. ARGV: stale ms.
/// Drops registry entries not seen for `stale` and consumers with nothing pending that are
/// idle as long and not in the registry. Reply: number of registry entries dropped.
pub(crate) static PRUNE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local now = tonumber(now_ms())
local stale = tonumber(ARGV[1])
local removed = 0
local live = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local ok, v = pcall(cjson.decode, flat[i + 1])
  local seen = 0
  if ok and type(v) == 'table' then seen = tonumber(v.seen) or 0 end
  if now - seen > stale then
    redis.call('HDEL', KEYS[1], flat[i])
    removed = removed + 1
  else
    live[flat[i]] = true
  end
end
for i = 2, 3 do
  local cs = redis.pcall('XINFO', 'CONSUMERS', KEYS[i], GROUP)
  if type(cs) == 'table' and not cs.err then
    for _, c in ipairs(cs) do
      local info = pairs_to_table(c)
      if info.name and not live[info.name] and tonumber(info.pending) == 0
          and tonumber(info.idle) > stale then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[i], GROUP, info.name)
      end
    end
  end
end
return removed
"#,
    )
});

/// A worker leaves its pool: every entry still pending under its name is handed back (a
/// claimed job gives its attempt back and sends `retrying`/`HandedBack`; a job with a cancel
/// request is cancelled; stale entries are dropped), its consumers are deleted and its
/// registry entry removed.
/// KEYS: registry, high, normal, events. ARGV: worker, job-key prefix, events maxlen, ttl ms, message.
/// Reply: number of jobs handed back.
pub(crate) static LEAVE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local worker, job_prefix = ARGV[1], ARGV[2]
local ctx = {events = KEYS[4], events_maxlen = ARGV[3], ttl = ARGV[4]}
local handed = 0
for i = 2, 3 do
  local s = KEYS[i]
  local p = redis.pcall('XPENDING', s, GROUP, '-', '+', 1000, worker)
  if type(p) == 'table' and not p.err then
    for _, e in ipairs(p) do
      local id = e[1]
      local r = redis.call('XRANGE', s, id, id)
      local uid = nil
      if r[1] then uid = pairs_to_table(r[1][2]).uid end
      local jobkey = job_prefix .. (uid or '')
      local job = nil
      if uid then job = load_job(jobkey) end
      local ts = now_ms()
      if not job or TERMINAL[job.state] or job.entry ~= id then
        ackdel(s, id)
      elseif job.cancel == '1' then
        finish_cancelled(ctx, jobkey, uid, job, s, id, job.attempt or '0',
          'cancelled while its worker was leaving', ts)
      else
        local attempt = tonumber(job.attempt) or 0
        local running = job.state == 'running'
        if running then attempt = math.max(attempt - 1, 0) end
        local newid = add_entry(s, uid, job, attempt)
        ackdel(s, id)
        redis.call('HSET', jobkey, 'state', 'queued', 'worker', '', 'entry', newid,
          'stream', s, 'attempt', tostring(attempt))
        redis.call('HDEL', jobkey, 'stage', 'step', 'total_steps')
        if running then
          emit(ctx.events, ctx.events_maxlen, 'retrying', uid, job, attempt, worker, ts,
            error_payload('HandedBack', ARGV[5]))
          handed = handed + 1
        end
      end
    end
    redis.pcall('XGROUP', 'DELCONSUMER', s, GROUP, worker)
  end
end
redis.call('HDEL', KEYS[1], worker)
return handed
"#,
    )
});
