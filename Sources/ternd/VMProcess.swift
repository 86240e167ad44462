import Foundation
import Glibc

/// A tern process on this host: started detached (its own session, so that it outlives
/// the agent that started it), and found again by pid and start time (so that a reused
/// pid is not mistaken for it).
struct VMProcess: Codable, Equatable {
    var pid: Int32
    /// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
    var startTicks: UInt64

    /// Starts `executable` with `arguments`, stdin from /dev/null and output appended to `log`.
    static func spawn(_ executable: String, _ arguments: [String], log: String) throws -> VMProcess {
        var actions = posix_spawn_file_actions_t()
        var attributes = posix_spawnattr_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawnattr_init(&attributes)
        defer {
            posix_spawn_file_actions_destroy(&actions)
            posix_spawnattr_destroy(&attributes)
        }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        // Nothing else of the agent's (its sockets are not close-on-exec): a VM holding the agent's
        // listening socket would keep the next agent from binding it.
        for fd in Self.openDescriptors() where fd > 2 { posix_spawn_file_actions_addclose(&actions, fd) }
        // Its own session: a signal to the agent's process group (Ctrl-C, a service manager
        // stopping the agent) does not reach the VMs.
        posix_spawnattr_setflags(&attributes, Int16(0x80 /* POSIX_SPAWN_SETSID */))
        var pid: pid_t = 0
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        let result = posix_spawn(&pid, executable, &actions, &attributes, argv, environ)
        guard result == 0 else { throw AgentError.spawn("\(executable): \(String(cString: strerror(result)))") }
        return VMProcess(pid: pid, startTicks: Self.stat(pid)?.startTicks ?? 0)
    }

    private static func openDescriptors() -> [Int32] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).compactMap { Int32($0) }
    }

    /// Whether this process still runs (reaping it if it was our child and has ended).
    var isAlive: Bool {
        var status: Int32 = 0
        if waitpid(pid, &status, WNOHANG) == pid { return false }
        guard let stat = Self.stat(pid) else { return false }
        return stat.startTicks == startTicks && stat.state != "Z"
    }

    /// User and system CPU time, in seconds.
    var cpuSeconds: Double {
        guard let stat = Self.stat(pid), stat.startTicks == startTicks else { return 0 }
        return Double(stat.cpuTicks) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    func signal(_ number: Int32) {
        if isAlive { kill(pid, number) }
    }

    struct Stat {
        var state: Character
        var cpuTicks: UInt64
        var startTicks: UInt64
    }

    static func stat(_ pid: Int32) -> Stat? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return nil }
        // After "pid (comm)": state is field 3; utime 14, stime 15, starttime 22.
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 19, let state = fields[0].first, let utime = UInt64(fields[11]), let stime = UInt64(fields[12]),
              let start = UInt64(fields[19]) else { return nil }
        return Stat(state: state, cpuTicks: utime + stime, startTicks: start)
    }
}

enum AgentError: Error, CustomStringConvertible {
    case spawn(String)
    case state(String)

    var description: String {
        switch self {
        case .spawn(let why): "cannot start tern: \(why)"
        case .state(let why): why
        }
    }
}
