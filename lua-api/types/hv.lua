---@meta hv
-- LuaLS annotations for luvisor's `hv` module. Point your editor's Lua language server at
-- this folder (e.g. "workspace.library": ["<luvisor>/lua-api/types"]) for completion and
-- type checking. The module is available as the global `hv` and as `require "hv"`.

---A size: bytes as an integer, or a string with a binary suffix: "512K", "128M", "2G".
---@alias hv.Size integer|string

---@class hv
---@field version string luvisor's version.
---@field guest hv.guest_ns Guest descriptions.
---@field disk hv.disk_ns Disk images.
hv = {}

---@class hv.disk_ns
local disk_ns = {}

---@class hv.DiskStats
---@field reads integer
---@field writes integer
---@field flushes integer
---@field discards integer Discard and write-zeroes requests.
---@field bytes_read integer
---@field bytes_written integer
---@field errors integer Requests that failed (host I/O errors, malformed requests).
---@field format "raw"|"qcow2"
---@field format_probed boolean True when no format was given and it was probed.
---@field backing hv.BackingImage[] The images under an overlay, nearest first.

---@class hv.BackingImage
---@field path string
---@field format "raw"|"qcow2"
---@field format_recorded boolean False when the overlay records no backing format (read as raw).
---@field note? string Set when format_recorded is false.

---A disk image. Its file is opened and locked when a VM using it starts.
---@class hv.Disk
---@field path string
---@field size integer Bytes.
---@field format "raw"|"qcow2"
---@field readonly boolean
---@field serial string What GET_ID returns (default: the file name, up to 20 bytes).
local Disk = {}

---I/O counters of this disk, across every VM that used it through this object.
---@return hv.DiskStats
function Disk:stats() end

---@class hv.DiskCreateOptions
---@field path string Must not exist.
---@field size hv.Size A non-zero multiple of 512 bytes.
---@field format? "raw"|"qcow2" Default raw (sparse), treated as probed: the guest may not plant another format's header in sector 0.
---@field serial? string Up to 20 bytes, no NUL.

---Creates an empty image.
---@param opts hv.DiskCreateOptions
---@return hv.Disk
function disk_ns.create(opts) end

---@class hv.DiskOpenOptions
---@field readonly? boolean Default false. Read-only disks reject writes with an I/O error.
---@field format? "raw"|"qcow2" Used as given. Omitted: probed, other formats refused, and a probed raw disk refuses guest writes that would make it probe as another format.
---@field serial? string Up to 20 bytes, no NUL.

---@class hv.DiskSpec: hv.DiskOpenOptions
---@field path string

---Opens an existing image. Fails if it is missing, not a multiple of 512 bytes, in a
---format luvisor does not read, or locked against this access by another VM or process
---(QEMU included).
---@param path string
---@param opts? hv.DiskOpenOptions
---@return hv.Disk
function disk_ns.open(path, opts) end

---@class hv.DiskOverlayOptions
---@field base string|hv.Disk The image whose data shows through; nobody may be writing it.
---@field path string The new qcow2 file; must not exist.
---@field format? "raw"|"qcow2" The base's format (probed when omitted); recorded in the overlay.
---@field serial? string

---Creates a qcow2 copy-on-write overlay of `base`; the base is never written through it.
---@param opts hv.DiskOverlayOptions
---@return hv.Disk
function disk_ns.overlay(opts) end

---@class hv.guest_ns
local guest_ns = {}

---@class hv.Guest
---@field kind "builtin"
---@field cmdline string

---@class hv.BuiltinGuestOptions
---@field cmdline? string Commands separated by ";" (see guest/README.md). Default: "": the
---guest serves its agent channel (vm:exec, vm:shutdown) until shut down (or, with agent =
---false, exits 0 at once).
---At most 3072 bytes, counting the entry each disk adds at start (35 or 36 bytes); no NUL bytes.

---Selects the built-in CPL3 test guest.
---@param opts? hv.BuiltinGuestOptions
---@return hv.Guest
function guest_ns.builtin(opts) end

---Dynamic memory: the guest sees `max` bytes of RAM and a virtio-balloon device holds it
---down to a target, which starts at `startup` and stays within [min, max].
---@class hv.MemoryOptions
---@field startup hv.Size What the guest has at boot. Required.
---@field min? hv.Size The least the guest is ever left with (at least 4M). Default: startup.
---@field max? hv.Size The guest's RAM size, the most it can have. Default: startup.
---@field buffer? integer Percent of the guest's demand kept free on top of it, 5 to 2000. Default 20.
---@field weight? integer Priority when the host is short of memory, 0 to 10000. Default 5000.

---@class hv.VmOptions
---@field name string Unique among live VMs.
---@field vcpus? integer 1 to 8. Default 1.
---@field memory? hv.Size|hv.MemoryOptions Guest RAM, a multiple of 4K from 4M to 63G (default
---"128M"); or dynamic memory knobs, which add a virtio-balloon device when min < max.
---@field guest hv.Guest What runs inside.
---@field console? string Also append console output to this file (or fifo, which must
---already have a reader; output a full fifo has no room for is dropped). A write error
---stops the copying and is reported in `Vm.console_error`.
---@field disks? (hv.Disk|hv.DiskSpec)[] virtio-blk devices, in this order (at most 16); each image once.
---@field agent? boolean Attach the agent channel (heartbeat, time, key-value pairs, shutdown,
---exec; see docs/agent.md). Default true.

---"migrated": moved to another host (final, like "stopped"); "incoming": arriving by live
---migration, built but not yet running (only stop applies).
---@alias hv.VmState "created"|"running"|"paused"|"stopped"|"crashed"|"migrated"|"incoming"

---@class hv.WaitOptions
---@field timeout? number Seconds; default 30; math.huge waits without limit.

---@class hv.ConsoleWaitOptions: hv.WaitOptions
---@field after? integer Only match output at or after this console offset.

---A handle on a VM. It resolves the VM on every use; once the VM is destroyed, every
---field and method raises "vm 'name' no longer exists".
---@class hv.Vm
---@field id integer Never reused in this process.
---@field name string
---@field state hv.VmState
---@field vcpus integer
---@field memory_size integer Guest RAM in bytes.
---@field memory_resident integer Bytes of guest RAM resident on the host (0 once stopped).
---@field memory hv.VmMemory Dynamic memory: size, balloon target, statistics, guest-physical access.
---@field boot_time_ms number? Time from start() until the guest reported ready.
---@field run_time_ms number Guest running time, paused time excluded.
---@field exit_code integer? The guest's exit code (0 to 4294967295), once it exited by itself.
---@field crash_reason string? Why it crashed (exit kind and RIP).
---@field console_offset integer Console bytes written so far (for wait_for_console's `after`).
---@field console_error string? Why console output stopped being copied to the `console` file (a write failed), or nil.
---@field health hv.Health How the guest's agent answers heartbeats.
---@field agent hv.AgentStats? What the agent channel carried and refused; nil for a VM created with agent = false.
---@field kvp hv.VmKvp Key-value pairs: `kvp.host` the host publishes, `kvp.guest` the guest does.
local Vm = {}

---"ok": heard from within 2.5 s of running time; "late": silent for 2.5 s or more; "lost":
---silent for 5 s or more; "waiting": running, its agent has not connected yet; "none": no
---agent channel, or no machine (not started, or ended).
---@alias hv.HealthState "ok"|"late"|"lost"|"waiting"|"none"

---@class hv.Health
---@field state hv.HealthState
---@field last_seen_ms integer? Milliseconds of running time since the guest last sent anything; nil if it never did.

---@class hv.AgentStats
---@field connected boolean The guest's agent said HELLO.
---@field name string? The agent's name ("luvisor-guest").
---@field frames_received integer
---@field frames_sent integer
---@field malformed integer Frames dropped: bad version, flags or CRC, or a payload that does not decode.
---@field oversized integer Frame headers announcing more than 64 KiB.
---@field discarded_bytes integer Bytes dropped while getting back in step.
---@field unknown integer Frames of an unknown type, or of a type only the host sends.
---@field kvp_refused integer Guest pairs over the limits.
---@field stale_replies integer Exec results nobody waited for any more.
---@field bad_buffers integer Guest buffers the device could not use.
---@field sessions integer
---@field pings integer
---@field pongs integer
---@field time_generation integer The last clock setting pushed to the guest.
---@field time_generation_applied integer The last one the guest applied.

---A VM's key-value pairs. Keys: 1 to 64 bytes of letters, digits, `_-.:`; values at
---most 1024 bytes; at most 256 keys each side.
---@class hv.VmKvp
---@field host hv.KvpHost What the host publishes to the guest.
---@field guest hv.KvpGuest What the guest publishes (the built-in guest: boot_id, uptime_ms, ready).

---@class hv.KvpHost
local KvpHost = {}

---Publishes `key = value` to the guest (at once, or when its agent connects).
---@param key string
---@param value string|number|boolean
function KvpHost:set(key, value) end

---@param key string
---@return string?
function KvpHost:get(key) end

---Withdraws a key; whether it was set.
---@param key string
---@return boolean
function KvpHost:delete(key) end

---@return table<string, string>
function KvpHost:list() end

---@class hv.KvpGuest
local KvpGuest = {}

---@param key string
---@return string?
function KvpGuest:get(key) end

---@return table<string, string>
function KvpGuest:list() end

---Waits until the guest publishes `key` (equal to `value`, when given); returns its value.
---A safe point for hv.on handlers.
---@param key string
---@param opts? { value?: string, timeout?: number }
---@return string
function KvpGuest:wait(key, opts) end

---@class hv.ExecResult
---@field code integer 0 ok, 2 after an error (as on the guest's command line).
---@field stdout string What the command printed (at most 32 KiB).
---@field truncated boolean The output was cut at 32 KiB.

---Runs one of the guest's commands (a line of commands separated by ";") through the
---agent channel; its console output comes back in `stdout` instead of going to the
---console. One exec at a time per VM; before the agent connects, waits for it. After an
---exec that timed out, the next one waits (within its own timeout) for the guest to
---finish that one. A safe point for hv.on handlers.
---@param command string At most 1024 bytes of UTF-8 text, one line.
---@param opts? { timeout?: number } Seconds; default 30.
---@return hv.ExecResult
function Vm:exec(command, opts) end

---@class hv.ShutdownResult
---@field how "graceful"|"forced"|"crashed"|"already_stopped" graceful: the guest exited; crashed: it crashed instead; forced: a hard stop (or something else ended it)
---@field code integer? The guest's exit code, when it exited by itself.
---@field state hv.VmState
---@field acknowledged boolean The guest's agent answered the request.
---@field took_ms number
---@field outcome string How the VM ended, in words.
---@field reason string? Why it crashed, if it did.

---Asks the guest to shut down, waits up to `timeout` for it to end, then stops it hard.
---A paused VM, or one without an agent, is stopped at once. A safe point for hv.on handlers.
---@param opts? { timeout?: number } Seconds; default 10.
---@return hv.ShutdownResult
function Vm:shutdown(opts) end

---The guest's clock minus the host's in milliseconds, as of the guest's last report (each
---heartbeat); nil before it reported, and again after a resume, restore or arrival until
---it reports (the older figure is stale).
---@return number?
function Vm:time_drift_ms() end

---The guest's memory statistics, as its balloon driver last sent them. A statistic the
---guest did not send is nil.
---@class hv.MemoryStats
---@field swap_in integer?
---@field swap_out integer?
---@field major_faults integer?
---@field minor_faults integer?
---@field free integer? Bytes.
---@field total integer? Bytes: RAM less the balloon.
---@field available integer? Bytes.
---@field caches integer? Bytes.
---@field hugetlb_allocations integer?
---@field hugetlb_failures integer?
---@field age_ms number How long ago the guest sent them.

---A VM's memory (`vm.memory`). Like the VM handle, it resolves the VM on every use.
---@class hv.VmMemory
---@field size integer Guest-visible memory now: max less what the balloon holds.
---@field target integer The balloon target in bytes: what the guest is asked to have.
---@field held integer Bytes the balloon holds (pages the host took back).
---@field resident integer Bytes of guest RAM resident on the host.
---@field startup integer
---@field min integer
---@field max integer
---@field buffer integer Percent.
---@field weight integer
---@field stats hv.MemoryStats? nil until the guest first sends statistics.
---@field stats_period number Seconds between statistics requests (0: none). Default 1.
local VmMemory = {}

---Sets the balloon target, clamped to [min, max] and rounded down to 4K. A running VM's
---balloon follows at once; a VM that is not running starts with it.
---@param target hv.Size
---@param opts? { reason?: string } `reason` goes into the log (default "script").
---@return integer applied
---@return boolean clamped Whether the target had to be changed to fit.
function VmMemory:set_target(target, opts) end

---How often the balloon asks the guest for statistics: 0 stops it, otherwise 0.1 to
---86400 seconds.
---@param seconds number
function VmMemory:set_stats_period(seconds) end

---Reads guest-physical memory (the VM must be running or paused; at most 64 MiB).
---@param gpa integer
---@param len integer
---@return string
function VmMemory:read(gpa, len) end

---Writes guest-physical memory (marked as written by the VMM, so diff snapshots see it).
---@param gpa integer
---@param bytes string
function VmMemory:write(gpa, bytes) end

---Builds the machine and starts every vCPU. Only a `created` VM can start.
function Vm:start() end

---Pauses the guest; returns once every vCPU has left KVM_RUN. No guest time passes while paused.
function Vm:pause() end

---Continues a paused guest exactly where it was.
function Vm:resume() end

---Hard stop: vCPUs torn down, guest memory freed. Idempotent. The record (console, exit
---code) stays until destroy().
function Vm:stop() end

---Stops the VM if needed and forgets it: its name is free again and this handle is stale.
function Vm:destroy() end

---Sends `text` (any bytes) to the guest's serial console (COM1 input); the built-in guest
---reads it with its `listen` command. The VM must be running or paused (input sent while
---paused waits). Up to 64 KiB beyond the UART's 64-byte FIFO wait for the guest to read
---them; a `text` that does not fit in what is free raises an error and queues nothing.
---@param text string
function Vm:send(text) end

---The captured console output (the last 1 MiB).
---@return string
function Vm:console() end

---@class hv.SnapshotOptions
---@field stop? boolean stop the VM after the snapshot instead of resuming it (default false)
---@field base? string take a diff against this snapshot (the VM's latest snapshot or restore)
---@field disks? "frozen"|"shared" frozen (default): disks become read-only and the VM goes on in new overlays

---@class hv.SnapshotReport
---@field path string the snapshot directory (absolute)
---@field diff boolean
---@field memory_bytes integer bytes of guest memory written (zero pages are holes)
---@field memory_pages integer
---@field state_bytes integer
---@field paused_ms number how long the VM was paused
---@field overlays table<integer, string> the new image each frozen disk's VM writes to

---Saves the VM into the new directory `path` (pausing it meanwhile) and lets it go on.
---@param path string
---@param opts? hv.SnapshotOptions
---@return hv.SnapshotReport
function Vm:snapshot(path, opts) end

---@class hv.MigrationProgress
---@field iteration integer 0 for the full pass, then one per pass over dirtied pages
---@field remaining_bytes integer what this pass sends at most
---@field sent_bytes integer bytes sent so far
---@field mbps number measured throughput, megabits per second
---@field throttle number share of time auto-converge holds the vCPUs paused (0 to 0.95)
---@field final boolean the last pass, with the VM paused

---@class hv.MigrateOptions
---@field key_file string the pre-shared key both hosts hold (a file only its owner can read)
---@field max_downtime_ms? integer what the last pages may take to send (default 50)
---@field timeout? number seconds for the whole migration (default 60)
---@field auto_converge? boolean hold the vCPUs paused part of the time when the guest dirties memory faster than the link carries it (default false)
---@field on_progress? fun(p: hv.MigrationProgress) called before each pass; an error in it cancels the migration

---@class hv.MigrationReport
---@field downtime_ms number from pausing here to running there
---@field total_ms number
---@field bytes_sent integer
---@field iterations integer passes over memory, the full and the final one included
---@field pages_sent integer pages sent as data
---@field zero_pages integer pages sent as zero markers
---@field final_pages integer pages of the final pass
---@field mbps number average throughput of the page passes, megabits per second
---@field throttle number the highest auto-converge share used
---@field destination_build_ms number what the destination took to build the VM

---Moves the running (or paused) VM to the luvisor host listening at `addr`, live. On
---success the VM runs there (a paused VM arrives paused) and is "migrated" here; on
---failure the error says where the VM is (normally: it goes on running, or stays paused,
---here). Both hosts must see its disks at the same paths.
---@param addr string "host:port"
---@param opts hv.MigrateOptions
---@return hv.MigrationReport
function Vm:migrate(addr, opts) end

---Waits for the guest to end. Returns the exit code (nil if it crashed or was stopped), the
---final state, and a description when there is no exit code.
---@param opts? hv.WaitOptions
---@return integer? code 0 to 4294967295
---@return hv.VmState state
---@return string? reason
function Vm:wait(opts) end

---Waits until the console shows `pattern` (plain text). Returns the whole line holding it
---and the console offset just past the match. When the match arrives before the end of
---its line, the wait goes on for the line's newline; if the VM ends or the timeout runs
---out first, the line as far as it got is returned.
---@param pattern string
---@param opts? hv.ConsoleWaitOptions
---@return string line
---@return integer offset
function Vm:wait_for_console(pattern, opts) end

---Creates a VM in state "created".
---@param opts hv.VmOptions
---@return hv.Vm
function hv.vm(opts) end

---Handles of every VM in this process, in creation order.
---@return hv.Vm[]
function hv.vms() end

---Builds a new VM from the snapshot in `path` and runs it from where it was saved. Each
---frozen disk gets a new overlay `<image>.<name>.qcow2`. A bad snapshot is refused and
---creates nothing.
---@param path string
---@param opts? { name?: string }
---@return hv.Vm
function hv.restore(path, opts) end

---@class hv.ArrivalInfo
---@field from string the source's address
---@field bytes_received integer
---@field total_ms number from the offer to running vCPUs
---@field build_ms number building the VM from the final state

---Receives VMs by live migration in this process.
---@class hv.Listener
---@field address string? the address it listens on; nil once closed
local Listener = {}

---The next VM that arrives, once it runs here.
---@param opts? hv.WaitOptions
---@return hv.Vm vm
---@return hv.ArrivalInfo info
function Listener:wait_arrival(opts) end

---Stops accepting connections (migrations in progress finish).
function Listener:close() end

hv.migration = {}

---Accepts authenticated peers on `addr` ("127.0.0.1:0" picks a free port): VMs migrate
---into this process.
---@param addr string
---@param opts { key_file: string }
---@return hv.Listener
function hv.migration.listen(addr, opts) end

---Sets the function `luvisor serve --listen` calls for each VM that arrives and runs;
---nil removes it.
---@param handler fun(vm: hv.Vm, info: hv.ArrivalInfo)?
function hv.migration.on_arrival(handler) end

---@class hv.KvmInfo
---@field api integer KVM API version (12).
---@field backend "pvm"|"hardware"|"unknown"
---@field max_vcpus integer
---@field irqchip boolean
---@field irqfd boolean
---@field ioeventfd boolean
---@field dirty_log boolean

---@class hv.HostInfo
---@field cpus integer
---@field memory_total integer Bytes.
---@field memory_available integer Bytes.
---@field process_rss integer This process's resident memory, bytes.
---@field process_cpu_seconds number CPU time this process used so far.
---@field kvm hv.KvmInfo|false False when /dev/kvm cannot be opened (see kvm_error).
---@field kvm_error string?

---Facts about this host and its KVM.
---@return hv.HostInfo
function hv.host() end

---Sleeps for `seconds` (fractions allowed). A safe point: handlers of queued events
---(hv.on) run here.
---@param seconds number
function hv.sleep(seconds) end

---"heartbeat_lost": a guest that answered before was silent for 5 s of running time;
---"heartbeat_restored": it answered again.
---@alias hv.EventName "heartbeat_lost"|"heartbeat_restored"

---Calls `handler(vm)` for every event `name` about any VM of this process. Events are
---queued where they happen and handlers run at safe points: hv.sleep, vm:wait,
---vm:wait_for_console, vm:exec, vm:shutdown, vm.kvp.guest:wait, hv.handle_events, and
---`luvisor serve`'s loop. A handler's error ends the waiting call with that error.
---Unknown names are an error listing the known ones. Under `luvisor test`, the handler is
---removed when the test (or file top level) that added it ends.
---@param name hv.EventName
---@param handler fun(vm: hv.Vm)
---@return integer id For hv.off.
function hv.on(name, handler) end

---Removes the handler hv.on returned `id` for; whether there was one.
---@param id integer
---@return boolean
function hv.off(id) end

---Runs the handlers of every event queued so far, now.
function hv.handle_events() end

---Seconds on a monotonic clock, for timing (os.clock() is CPU time).
---@return number
function hv.now() end

---@class hv.PolicyDecision
---@field vm string
---@field asked integer What the policy asked for, bytes.
---@field target integer What was applied: asked within [min, max], whole pages.
---@field clamped boolean asked was outside [min, max].
---@field previous integer The VM's target before the tick.
---@field reason string

---@class hv.PolicyStatus
---@field name string? Nil until a version of the file loaded.
---@field file string
---@field description string?
---@field generation integer Versions loaded so far (0: none).
---@field running boolean
---@field interval_ms integer
---@field ticks integer Ticks run, failed ones included.
---@field failures integer
---@field last_tick_ms number?
---@field last_error string? The last failed tick or refused version, with file and line.
---@field decisions hv.PolicyDecision[] The last successful tick's decisions.
---@field decisions_tick integer
---@field migrate_decisions hv.MigrateDecision[] The migrate intents of the last tick that made any, with the guards' verdicts.
---@field migrate_decisions_tick integer
---@field pool_decisions hv.PoolDecision[] The warm pool targets of the last tick that set any.
---@field pool_decisions_tick integer
---@field migrations hv.PolicyMigration[] Migrations this policy started: recently ended ones, then those in flight.

---@class hv.PoolDecision
---@field pool string
---@field asked integer Ready VMs the policy asked for.
---@field target integer What the pool was set to: within [min, max] and the host's free memory.
---@field clamped boolean
---@field previous integer The pool's target before the tick.
---@field reason string

---@class hv.MigrateDecision
---@field vm string
---@field host string The peer host's name.
---@field reason string The policy's reason.
---@field refused string? Why the guards refused it; nil when it was started.

---@class hv.PolicyMigration
---@field id integer
---@field policy string
---@field vm string
---@field host string
---@field addr string
---@field reason string
---@field state "running"|"succeeded"|"failed"
---@field started_ms integer On the policies' clock (ctx.now_ms).
---@field ended_ms integer?
---@field report table? The migration's report, once it succeeded.
---@field error string? Why it failed.

---@class hv.MigrationLimits
---@field per_host? integer Most outgoing migrations at once from this host (0 to 64, default 1; 0 turns policy migrations off).
---@field cooldown_s? number After a VM's migration ends, seconds before it may migrate again (default 60).
---@field bandwidth? hv.Size Bytes per second ctx:migration_cost assumes (at least 1M, default "1G").

---@class hv.PolicyLimits
---@field instruction_budget? integer Lua instructions per tick (default 20000000).
---@field memory_limit? integer|string Memory of the policy's Lua state (default "64M").

---Policies: Lua files that decide VM memory targets, each in its own sandboxed state on
---its own thread (see docs/policies.md).
hv.policy = {}

---Loads (or reloads) a policy file: fresh sandbox, checked table, one shadow tick, then it
---runs. Raises with the file and line when it fails; a failed reload keeps the previous
---version running.
---@param path string
---@param limits? hv.PolicyLimits
---@return hv.PolicyStatus
function hv.policy.load(path, limits) end

---Loads every policy file of `dir` and reloads each when it is saved (unloads it when
---removed). Failures show in the statuses instead of raising.
---@param dir string
---@param limits? hv.PolicyLimits
---@return hv.PolicyStatus[]
function hv.policy.watch(dir, limits) end

---Stops and forgets the policy `name`.
---@param name string
---@return true
function hv.policy.unload(name) end

---Every policy's status, or the one named `name` (nil if none).
---@param name? string
---@return hv.PolicyStatus[]|hv.PolicyStatus|nil
function hv.policy.status(name) end

---Records every policy tick (input and decisions) to `path` as JSON lines, for
---`luvisor policy simulate`; nil stops.
---@param path string?
function hv.policy.record(path) end

---Sets the guards on the migrations policies ask for (`ctx:migrate`); the keys given
---change, the others stay. Returns the limits now in force.
---@param limits? hv.MigrationLimits
---@return { per_host: integer, cooldown_s: number, bandwidth: integer }
function hv.policy.migration_limits(limits) end

---@class hv.PeerHostSpec
---@field name string Unique; 1 to 64 letters, digits, '_', '.', '-'. Policies name the host by it.
---@field addr string "host:port" of that host's `luvisor serve --listen`.
---@field key_file string The key that host serves with; only its owner may read it.

---@class hv.PeerHost
---@field name string
---@field addr string
---@field key_file string
---@field reachable boolean The last poll got an answer.
---@field memory_total integer? Figures of its last answer (nil if it never answered), bytes.
---@field memory_available integer?
---@field memory_reserve integer?
---@field vms integer? How many VMs it has.
---@field vms_resident integer?
---@field age_ms integer? How old the figures are.
---@field error string? Why the last poll failed.

---Declares the peer hosts policies may migrate VMs to, replacing any declared before
---(`hv.hosts{}` declares none). Each is polled in the background every second for its
---free memory and VM count, which policies read as `ctx.hosts`. Raises, changing
---nothing, on a duplicate name or address, a bad address, or a key file that cannot be
---read, is too short, or that other users can read. Without `list`, returns the peers
---as they stand.
---@param list? hv.PeerHostSpec[]
---@return hv.PeerHost[]
function hv.hosts(list) end

---@class hv.ConnectOptions
---@field key_file string The key file shared with that host (as its `luvisor serve --key-file`); only its owner may read it.
---@field timeout? number Seconds for connecting and for each answer (waits add their own time). Default 10.

---Connects to the `luvisor serve --listen` host at `addr` ("host:port") over the
---authenticated peer channel. Raises when it cannot connect or the key does not match.
---@param addr string
---@param opts hv.ConnectOptions
---@return hv.Host
function hv.connect(addr, opts) end

---@class hv.RemoteHostInfo: hv.HostInfo
---@field name string The host's name (its hostname).
---@field addr string The address this handle connects to.
---@field memory_reserve integer Bytes the host keeps for itself.
---@field vms_resident integer Guest memory resident over every VM of that host, bytes.

---A control connection to a remote host (see docs/remote.md). Errors from the host raise
---"host ADDR: <the host's message>". A call whose connection broke raises; the next call
---connects again.
---@class hv.Host
---@field addr string
---@field name string The host's name (its hostname).
local Host = {}

---`hv.host{}` of that host, with its name and address.
---@return hv.RemoteHostInfo
function Host:info() end

---Handles on every VM of that host, in creation order.
---@return hv.RemoteVm[]
function Host:vms() end

---The VM named `name` on that host; raises "host ADDR: there is no vm named 'x'; its VMs
---are: ..." when there is none.
---@param name string
---@return hv.RemoteVm
function Host:vm(name) end

---`hv.policy.status()` of that host.
---@return hv.PolicyStatus[]
function Host:policies() end

---The options of a remote VM's migrate: a local one's (hv.MigrateOptions), run by the
---VM's host.
---@class hv.RemoteMigrateOptions
---@field key_file? string A key file on the source host for the destination (default: the key the source serves with).
---@field max_downtime_ms? integer Longest pause allowed for the final copy. Default 300.
---@field timeout? number Seconds the whole migration may take. Default 120.
---@field auto_converge? boolean As for a local migrate (default false).
---@field on_progress? fun(p: hv.MigrationProgress) Called here with the progress the host streams while the migration runs: at most one report per pass and per 100 ms; when reports pile up while it runs, it gets only the newest, and none once the host has answered. An error in it cannot cancel the migration (the host runs it): it is raised once the host answered, saying how the migration ended.

---A VM on a remote host. It has the fields and methods of hv.Vm except `snapshot` and
---`destroy`, plus `host` and `migrate`; every use asks the host again. Waits run on the
---host, a second at a time, so Ctrl-C interrupts them (`exec` and `shutdown` run as one
---request each, of at most 600 s). hv.on handlers do not run while a remote call waits.
---@class hv.RemoteVm: hv.Vm
---@field host hv.Host
local RemoteVm = {}

---Asks the VM's host to live-migrate it to the host at `addr`. Returns the migration's
---report, with the fields of a local one; raises "host ADDR: cannot migrate vm 'x':
---migration is not available on this host" where the host has no migration, and
---"host ADDR: cannot migrate vm 'x' to DEST (it goes on running here): ..." when it
---fails.
---@param addr string
---@param opts? hv.RemoteMigrateOptions
---@return hv.MigrationReport
function RemoteVm:migrate(addr, opts) end

---When a VM counts as ready: "kvp:KEY" or "kvp:KEY=VALUE" (the guest published it over
---the agent channel; the built-in guest publishes ready = "1"), "console:TEXT" or a plain
---TEXT (the console shows it; not a Lua pattern). Default "kvp:ready". A key the agent
---channel refuses (1 to 64 bytes of letters, digits, '_', '-', '.', ':') is an error.
---@alias hv.Readiness string

---@class hv.DiskTemplate
---@field base string|hv.Disk The image every VM gets its own copy-on-write overlay of; never written.
---@field format? "raw"|"qcow2" The base's format (probed when omitted).
---@field serial? string What every VM's disk reports; up to 20 bytes.

---What every VM of a lab or pool is made from: hv.vm options but name, console and disks.
---@class hv.Template
---@field vcpus? integer
---@field memory? hv.Size|hv.MemoryOptions
---@field guest hv.Guest
---@field disks? hv.DiskTemplate[]

---@class hv.LabOptions
---@field name string VMs are NAME-1 .. NAME-count; 1 to 64 letters, digits, '-', '_', '.'.
---@field template hv.Template
---@field count integer 1 to 1024.
---@field ready? hv.Readiness Default "kvp:ready".
---@field dir? string Where the overlays go (NAME-i.diskK.qcow2); default the current directory (shared by the files of `luvisor test --jobs` without --isolate). Made with its parents if missing; every directory made is removed with the lab when empty.

---@class hv.LabStartOptions
---@field parallel? integer Most VMs booting at a time, 1 to 64. Default 4.
---@field timeout? number Seconds each VM has from its start to be ready. Default 30.
---@field progress? "auto"|"lines"|boolean "auto" (default): a bar on stderr when it is a terminal, else nothing; true: a bar on a terminal, else lines; "lines": lines; false: nothing.

---@class hv.LabStartReport
---@field elapsed_ms number From the call until every VM was ready.
---@field vms { name: string, ready_ms: number }[] Each VM's start-to-ready time, in order.

---VMs from one template, each disk an overlay of its base (see docs/labs.md). Destroyed
---(VMs and overlays) by destroy(), when the handle is closed (`local lab <close> = ...`)
---or collected, when the script ends, and when start fails.
---@class hv.Lab
---@field name string
---@field count integer
---@field state "created"|"starting"|"ready"|"shut down"|"destroyed" "shut down" after shutdown(): the VMs ended, the files stay.
---@field dir string
---@field ready string The readiness, as written.
---@operator len: integer
local Lab = {}

---Boots at most `parallel` VMs at a time until each is ready. The first VM that crashes,
---exits, times out or cannot be checked ends it, destroys the lab, and raises naming the
---VM and why; so does Ctrl-C.
---@param opts? hv.LabStartOptions
---@return hv.LabStartReport
function Lab:start(opts) end

---Calls fn(vm) for every VM in order; the list of its first results. An error stops it
---and is raised as "lab 'NAME': VM: message" (no traceback inside the message).
---@param fn fun(vm: hv.Vm): any
---@return any[]
function Lab:each(fn) end

---The lab's VMs that exist, in order.
---@return hv.Vm[]
function Lab:vms() end

---The VM at index `which` (from 1) or named `which`; nil when there is none.
---@param which integer|string
---@return hv.Vm?
function Lab:vm(which) end

---The overlay files the lab made.
---@return string[]
function Lab:overlays() end

---Ends every VM at once: each guest is asked to shut down through the agent channel, and
---every VM still running after `timeout` seconds (one deadline for the whole lab) is
---stopped hard. Ctrl-C stops every VM still running hard at once and raises "lab 'NAME':
---interrupted while shutting down (...)". The lab is then "shut down"; the VMs and
---overlays stay until destroy().
---@param opts? hv.WaitOptions
---@return { name: string, how: "graceful"|"forced"|"crashed"|"already_stopped", outcome: string }[]
function Lab:shutdown(opts) end

---Destroys every VM and removes every overlay (and the directory the lab made). Idempotent.
function Lab:destroy() end

---Makes a lab's overlays and VMs (state created). Checks everything first; a failure
---part way removes what was made.
---@param opts hv.LabOptions
---@return hv.Lab
function hv.lab(opts) end

---@class hv.PoolOptions
---@field name string VMs are NAME-1, NAME-2, ... (never reused); the template VM NAME-template.
---@field template hv.Template
---@field ready? hv.Readiness When the template VM counts as ready. Default "kvp:ready".
---@field min? integer Fewest ready VMs kept, 0 to max. Default 1.
---@field max? integer Most ready VMs kept, 1 to 256. Default 16.
---@field window? number Seconds of claims policies scale on (ctx.pools' claims_window). Default 10.
---@field dir? string Where the snapshot and overlays go. Default "NAME.pool".
---@field timeout? number Seconds for the template to be ready, then for the first `min` VMs. Default 30.

---@class hv.PoolStatus
---@field name string
---@field min integer
---@field max integer
---@field target integer Ready VMs kept now.
---@field target_reason string Who set it: "min", or the policy and its reason.
---@field ready integer
---@field claimed integer Claimed VMs that still exist.
---@field restoring integer
---@field claims integer Since the pool was defined.
---@field claims_window integer Claims in the last window_s seconds.
---@field window_s number
---@field returned integer Claimed VMs destroyed since the pool was defined.
---@field memory integer Guest memory of one VM, bytes.
---@field last_error string? The filler's last problem (a failed restore, no memory).
---@field last_restore_ms number? How long the last restore took.
---@field dir string
---@field ready_vms string[] Names of the ready VMs, oldest first.
---@field claimed_vms string[]

---A warm pool (see docs/labs.md). The handle holds the name; a removed pool's handle raises.
---@class hv.Pool
---@field name string
---@field dir string
---@field min integer
---@field max integer
---@field target integer
---@field ready integer
---@field claimed integer
---@field claims integer
---@field returned integer
local Pool = {}

---@param opts? hv.WaitOptions
---@return hv.Vm vm
---@return "warm"|"cold" how
function Pool:claim(opts) end

---@return hv.PoolStatus
function Pool:status() end

---@param n integer
---@param reason? string
---@return integer target
---@return boolean clamped
function Pool:set_target(n, reason) end

---Destroys every VM of the pool, claimed ones too, and removes its files.
function Pool:remove() end

---Warm pools: ready VMs restored from a snapshot of a booted template.
hv.pool = {}

---Boots the template, waits until it is ready, snapshots it and keeps `min` VMs ready;
---returns once `min` are, so a claim right after it is warm. Raises, leaving nothing, when
---the template does not become ready, a restore fails, or `min` VMs are not ready within
---`timeout` (the host's free memory).
---@param opts hv.PoolOptions
---@return hv.Pool
function hv.pool.define(opts) end

---A ready VM ("warm"), or one restored for this claim ("cold") when none is; waits up to
---`timeout` (default 30 s) when the host's free memory cannot hold one more. Destroying
---the VM gives it back to the pool's accounting. Under `luvisor test`, the VM is destroyed
---when the test that claimed it ends.
---@param pool string|hv.Pool
---@param opts? hv.WaitOptions
---@return hv.Vm vm
---@return "warm"|"cold" how
function hv.pool.claim(pool, opts) end

---Every pool's status, or the one of `pool` (nil if none).
---@param pool? string|hv.Pool
---@return hv.PoolStatus[]|hv.PoolStatus|nil
function hv.pool.status(pool) end

---Sets how many VMs to keep ready (clamped to [min, max] and the host's free memory).
---@param pool string|hv.Pool
---@param n integer
---@param reason? string
---@return integer target
---@return boolean clamped
function hv.pool.set_target(pool, n, reason) end

---Destroys every VM of the pool, claimed ones too, and removes its files.
---@param pool string|hv.Pool
function hv.pool.remove(pool) end

-----------------------------------------------------------------------------------------
-- `luvisor test` (docs/testing.md): globals defined in test files only.

---Declares a group of tests; groups nest. `fn` runs at once, while the file's top level
---runs, and declares the group's tests and hooks.
---@param name string
---@param fn fun()
function describe(name, fn) end

---Declares a test, named by its groups' names and `name` joined by spaces. Without `fn`
---it is pending. Every VM and overlay the test makes is destroyed when it ends, pass or
---fail.
---@param name string
---@param fn? fun()
function it(name, fn) end

---Declares a pending test (counted, never run). Inside a running test, stops it and
---counts it as pending, with `name` as the reason.
---@param name string
---@param reason? string
function pending(name, reason) end

---Runs `fn` before every test of this group and its subgroups (outer groups first).
---@param fn fun()
function before_each(fn) end

---Runs `fn` after every test of this group and its subgroups (inner groups first), even
---when the test failed.
---@param fn fun()
function after_each(fn) end

---In test files, `assert` is Lua's `assert(v, message, ...)` and a table of assertions.
---Each failure reports the file and line of the assertion and how the values differ.
---@class luvisor.assert
---@overload fun(v: any, message?: any, ...: any): ...
assert = {}

---Passes when `expected` and `actual` are equal: tables by content, recursively (a diff
---path by path), strings with several lines shown as a line diff, everything else with
---`==` (NaN equals NaN). Returns `actual`.
---@generic T
---@param expected any
---@param actual T
---@param message? string
---@return T
function assert.equal(expected, actual, message) end

---Passes when the values are not equal in the sense of `assert.equal`.
---@generic T
---@param unexpected any
---@param actual T
---@param message? string
---@return T
function assert.not_equal(unexpected, actual, message) end

---Passes when `v` is neither nil nor false.
---@generic T
---@param v T
---@param message? string
---@return T
function assert.truthy(v, message) end

---Passes when `v` is nil or false.
---@param v any
---@param message? string
function assert.falsy(v, message) end

---Passes when `fn()` raises an error whose message matches the Lua `pattern` (any error
---without one). Returns the message.
---@param fn fun()
---@param pattern? string
---@param message? string
---@return string
function assert.error(fn, pattern, message) end

---Passes when `fn()` raises an error whose message contains `text` literally. Returns the
---message.
---@param fn fun()
---@param text string
---@param message? string
---@return string
function assert.error_contains(fn, text, message) end

---Passes when `s` is a string matching the Lua `pattern`. Returns `s`.
---@param pattern string
---@param s any
---@param message? string
---@return string
function assert.match(pattern, s, message) end

---Passes when `s` is a string containing `text` literally. Returns `s`.
---@param text string
---@param s any
---@param message? string
---@return string
function assert.contains(text, s, message) end

---Always fails.
---@param message? string
function assert.fail(message) end

---Passes when `v` is `true` / `false` / `nil` / not `nil`. Returns `v`.
---@param v any
---@param message? string
function assert.is_true(v, message) end
---@param v any
---@param message? string
function assert.is_false(v, message) end
---@param v any
---@param message? string
function assert.is_nil(v, message) end
---@param v any
---@param message? string
function assert.is_not_nil(v, message) end

---Passes when `fn()` returns without raising.
---@param fn fun()
---@param message? string
function assert.has_no_error(fn, message) end

---busted's names for the same assertions: `same`/`equals` are `equal` (deep);
---`has_error`/`errors` are `error`; also `assert.are.same/equal`, `assert.are_not.same/equal`,
---`assert.has.error`, `assert.has_no.error`, `assert.is["true"|"false"|"nil"]`,
---`assert.is.truthy/falsy`, `assert.is_not["nil"]`.
assert.same = assert.equal
assert.equals = assert.equal
assert.has_error = assert.error
assert.errors = assert.error

return hv
