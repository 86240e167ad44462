import Foundation

/// Starts a named OS thread. vCPUs and blocking socket loops need real
/// threads, not tasks: they sit in ioctls and syscalls for long stretches.
@discardableResult
public func spawnThread(named name: String, _ body: @escaping @Sendable () -> Void) -> Thread {
    let thread = Thread(block: body)
    thread.name = name
    thread.stackSize = 1 << 20
    thread.start()
    return thread
}
