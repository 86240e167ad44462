import CKVM
import Foundation
import Glibc
import TernKVM

/// Drives one vCPU on its own thread: a small state machine (running,
/// paused, stopped) controlled by requests from other threads.
///
/// The handshake with a running vCPU: the controller records its request,
/// then sets kvm_run.immediate_exit and signals the thread. The thread clears
/// immediate_exit *before* it reads the request, so a request made at any
/// moment either is seen at once or makes the next KVM_RUN return at once.
final class VcpuRunner: @unchecked Sendable {
    // @unchecked Sendable: `request`, `status` and `thread` are guarded by `condition`.
    enum Request { case run, pause, stop }
    enum Status: Equatable { case notStarted, running, paused, stopped }

    let vcpu: Vcpu
    private let condition = NSCondition()
    private var request = Request.run
    private var status = Status.notStarted
    private var thread: pthread_t?
    private var kernelThreadID: Int32?
    private var started = false
    /// A halt check is pending / its result: halted with interrupts off (and its registers), or not.
    private var haltCheckPending = false
    private var haltCheckResult: RegisterDump??

    static let kickSignal = SIGUSR1

    init(vcpu: Vcpu) {
        self.vcpu = vcpu
    }

    /// Installs a do-nothing handler for the kick signal, without SA_RESTART,
    /// so the signal interrupts KVM_RUN with EINTR instead of killing us.
    static let installKickHandler: Void = {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0
        sigaction(kickSignal, &action, nil)
    }()

    /// Starts the thread. `handle` deals with one exit and returns the
    /// machine exit when the vCPU cannot continue.
    func start(paused: Bool, handle: @escaping @Sendable (VcpuExit) -> MachineExit?, onExit: @escaping @Sendable (MachineExit) -> Void) {
        _ = Self.installKickHandler
        condition.lock()
        if paused { request = .pause }
        started = true
        condition.unlock()
        spawnThread(named: "vcpu\(vcpu.id)") { [self] in
            // The signal mask is inherited (from whoever exec'd us, too): make sure kicks get through.
            var kickSet = sigset_t()
            sigemptyset(&kickSet)
            sigaddset(&kickSet, Self.kickSignal)
            pthread_sigmask(SIG_UNBLOCK, &kickSet, nil)
            condition.lock()
            thread = pthread_self()
            kernelThreadID = ckvm_gettid()
            condition.unlock()
            if let exit = loop(handle) { onExit(exit) }
            condition.lock()
            status = .stopped
            condition.broadcast()
            condition.unlock()
        }
    }

    private func loop(_ handle: (VcpuExit) -> MachineExit?) -> MachineExit? {
        while true {
            vcpu.setImmediateExit(false)
            condition.lock()
            while request == .pause {
                status = .paused
                condition.broadcast()
                condition.wait()
            }
            if request == .stop {
                condition.unlock()
                return nil
            }
            status = .running
            condition.unlock()

            let exit: VcpuExit
            do {
                exit = try vcpu.run()
            } catch {
                return MachineExit(kind: .error, message: "\(error)", vcpu: vcpu.id, registers: RegisterDump.capture(vcpu))
            }
            if case .interrupted = exit {
                answerHaltCheckIfAsked()
                continue
            }
            if let end = handle(exit) { return end }
        }
    }

    /// With the in-kernel LAPIC, HLT never leaves KVM_RUN: a guest that halts
    /// with interrupts disabled would sleep there forever. The machine's
    /// watchdog asks every vCPU now and then; a vCPU answers, from its own
    /// thread (the only one allowed to read its state), whether it is halted
    /// with IF clear, which nothing but an NMI or INIT could end.
    private func answerHaltCheckIfAsked() {
        condition.lock()
        let asked = haltCheckPending
        haltCheckPending = false
        condition.unlock()
        guard asked else { return }
        var halted: RegisterDump?
        if let mp = try? vcpu.mpState(), mp.mp_state == UInt32(KVM_MP_STATE_HALTED),
           let regs = try? vcpu.registers(), regs.rflags & 0x200 == 0 {
            halted = RegisterDump.capture(vcpu)
        }
        condition.lock()
        haltCheckResult = .some(halted)
        condition.broadcast()
        condition.unlock()
    }

    /// Starts a halt check (see `answerHaltCheckIfAsked`).
    func requestHaltCheck() {
        condition.lock()
        guard status == .running, request == .run else { condition.unlock(); return }
        haltCheckPending = true
        haltCheckResult = nil
        condition.unlock()
        kick()
    }

    /// The answer to the last halt check: registers if halted for good, nil if not or no answer (yet).
    func haltCheckAnswer(timeout: TimeInterval) -> RegisterDump?? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        condition.lock()
        defer { condition.unlock() }
        while haltCheckResult == nil {
            if !condition.wait(until: deadline) { return nil }
        }
        return haltCheckResult
    }

    private func kick() {
        vcpu.setImmediateExit(true)
        condition.lock()
        defer { condition.unlock() }
        // Only a thread still in its loop is signalled (a finished thread's id may be reused).
        if let thread, status != .stopped { pthread_kill(thread, Self.kickSignal) }
    }

    /// The kernel's id of the vCPU's thread (what a userfaultfd fault names); nil before it starts.
    var threadID: Int32? {
        condition.lock()
        defer { condition.unlock() }
        return kernelThreadID
    }

    /// Asks the vCPU to park. Without `kicking`, a vCPU inside KVM_RUN parks only when
    /// it next leaves it on its own (see `Machine.pauseForGood`).
    func requestPause(kicking: Bool = true) {
        condition.lock()
        if request == .run { request = .pause }
        condition.unlock()
        if kicking { kick() }
    }

    func requestStop() {
        condition.lock()
        request = .stop
        condition.broadcast()
        condition.unlock()
        kick()
    }

    func resume() {
        condition.lock()
        if request == .pause { request = .run }
        condition.broadcast()
        condition.unlock()
    }

    /// Blocks until the vCPU is parked (paused or gone). Returns false on timeout.
    @discardableResult
    func waitUntilParked(timeout: TimeInterval = 5) -> Bool {
        let deadline = Date(timeIntervalSinceNow: timeout)
        condition.lock()
        defer { condition.unlock() }
        while status != .paused && status != .stopped {
            if !started { return true }
            if !condition.wait(until: deadline) { return false }
        }
        return true
    }

    func waitUntilStopped() {
        condition.lock()
        while started && status != .stopped { condition.wait() }
        condition.unlock()
    }
}
