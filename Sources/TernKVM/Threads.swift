import Foundation
import CKVM

/// Starts a named OS thread. vCPUs and blocking socket loops need real
/// threads, not tasks: they sit in ioctls and syscalls for long stretches.
@discardableResult
public func spawnThread(named name: String, _ body: @escaping @Sendable () -> Void) -> Thread {
    let thread = Thread {
        // The kernel's name for the thread (top -H, /proc/PID/task/TID/comm): 15 bytes at most.
        _ = ckvm_set_thread_name(name)
        body()
    }
    thread.name = name
    thread.stackSize = 1 << 20
    thread.start()
    return thread
}

/// Puts the calling thread in the lowest real-time class (SCHED_FIFO, priority 1),
/// so that when it wakes it runs at once instead of waiting for a time slice
/// behind busy threads. For threads that block almost all the time and run
/// briefly: a post-copy fault's path. Returns false where not permitted
/// (no CAP_SYS_NICE); the thread then runs as before.
@discardableResult
public func makeCurrentThreadLatencyCritical() -> Bool {
    var parameters = sched_param()
    parameters.sched_priority = 1
    return pthread_setschedparam(pthread_self(), SCHED_FIFO, &parameters) == 0
}
