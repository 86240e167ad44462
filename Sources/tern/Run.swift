import ArgumentParser
import Foundation
import Glibc
import Logging
import Synchronization
import TernAPI
import TernDevices
import TernKVM
import TernMachine
import TernMigration
import TernWire

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Boot a kernel in a new VM and serve its API.")

    @Option(help: "Kernel to boot: a Multiboot image (ELF or a.out kludge) or a Linux bzImage (64-bit boot protocol).")
    var kernel: String?

    @Option(help: "Initial RAM disk for a Linux kernel.")
    var initrd: String?

    @Option(help: "Start from a snapshot file written by `tern snapshot` instead of booting a kernel.")
    var restore: String?

    @Option(help: "Kernel command line.")
    var cmdline: String = ""

    @Option(help: "Wait for a live migration on tcp:HOST:PORT or unix:PATH and run the VM that arrives.")
    var incoming: String?

    @Option(help: "Guest RAM, e.g. 512M or 2G (binary units; default 512M, or the snapshot's).")
    var memory: String?

    @Option(help: "Number of vCPUs (default 1, or the snapshot's).")
    var cpus: Int?

    @Option(help: ArgumentHelp("A virtio-blk disk on a raw image: path=FILE[,readonly=on][,id=NAME] (repeatable; ids default to disk0, disk1, ...).", valueName: "options"))
    var disk: [String] = []

    @Option(help: ArgumentHelp("A virtio-net NIC on an existing TAP: tap=NAME[,mac=MAC][,id=NAME] (repeatable; ids default to net0, ...; without mac=, one derived from the id and TAP name).", valueName: "options"))
    var net: [String] = []

    @Option(help: "Serial console: stdout, file:PATH, socket:PATH or off.")
    var serial: String = "stdout"

    @Option(help: "Path of the Unix socket serving the HTTP/JSON API.")
    var apiSocket: String?

    @Option(help: "With --incoming: mutual TLS 1.3 with the certificates in DIR (ca.pem, cert.pem, key.pem): only a source whose certificate chains to ca.pem may migrate a VM here.")
    var tlsDir: String?

    @Option(help: "With --tls-dir: accept only a source whose certificate names NAME (repeatable).")
    var tlsAllow: [String] = []

    @Flag(help: "With --incoming tcp:...: accept a migration in clear, without TLS (anyone who reaches the port can hand this host a VM, and anyone on the path can read its memory).")
    var insecure = false

    @Option(help: "With --incoming and --tls-dir: accept a migration only with a token signed by the key whose public half is FILE (token.pub from `tern token init`), unexpired, unused, and naming the VM, the source and this host.")
    var requireToken: String?

    @Option(help: "With --require-token: the file that records used tokens, shared by destinations on this host (default $XDG_STATE_HOME/tern/used-tokens).")
    var tokenLedger: String?

    @Option(help: "The VM's name, which it keeps across snapshots and migrations (letters, digits, '.', '_', '-'; default a new UUID).")
    var name: String?

    @Flag(help: "Create the VM but leave its vCPUs paused.")
    var paused = false

    @Flag(help: "Allocate and touch all guest RAM up front (like QEMU's -mem-prealloc). With --incoming it needs --memory, and is done while waiting, so the migration writes into memory that is already there.")
    var prealloc = false

    @Option(help: "Transparent huge pages for guest RAM: auto (where the kernel allows them), on, or off (4 KiB pages). With auto, a destination takes 4 KiB pages for a post-copy from the start (--mode postcopy), measured faster there on memory the host has not backed yet.")
    var thp: String = HugePages.auto.rawValue

    @Option(help: ArgumentHelp("KVM device node (for testing).", visibility: .hidden))
    var kvmDevice: String = "/dev/kvm"

    @Option(help: "Log level: trace, debug, info, notice, warning, error.")
    var logLevel: String = "info"

    /// The devices in the order given: disks first, then NICs (their slots in the MMIO window).
    func deviceSpecs() throws -> [DeviceSpec] {
        do {
            let specs = try disk.enumerated().map { DeviceSpec.disk(try DiskSpec(parsing: $1, index: $0)) }
                + net.enumerated().map { DeviceSpec.network(try NetworkSpec(parsing: $1, index: $0)) }
            try specs.validate()
            return specs
        } catch {
            throw ValidationError("\(error)")
        }
    }

    func validate() throws {
        _ = try deviceSpecs()
        guard HugePages(rawValue: thp) != nil else { throw ValidationError("--thp must be auto, on or off") }
        if incoming == nil, tlsDir != nil || !tlsAllow.isEmpty || insecure || requireToken != nil {
            throw ValidationError("--tls-dir, --tls-allow, --insecure and --require-token go with --incoming")
        }
        if requireToken != nil && tlsDir == nil {
            throw ValidationError("--require-token needs --tls-dir: a token names the source and this host as their certificates prove them")
        }
        if tokenLedger != nil && requireToken == nil { throw ValidationError("--token-ledger goes with --require-token") }
        if let name, let problem = MachineConfiguration.problem(withName: name) { throw ValidationError("--name: \(problem)") }
        if let incoming {
            if case .failure(let refusal) = ChannelSecurity.choose(tlsDirectory: tlsDir, allowedPeers: tlsAllow, insecure: insecure,
                                                                   for: try Endpoint(parsing: incoming), role: .server) {
                throw ValidationError(refusal.description)
            }
            if prealloc && memory == nil {
                throw ValidationError("--prealloc with --incoming needs --memory (the memory is prepared before the source connects)")
            }
            guard kernel == nil, restore == nil, cmdline.isEmpty, !paused, name == nil else {
                throw ValidationError("--incoming takes the VM from the source: no --kernel, --restore, --cmdline, --name or --paused")
            }
            return
        }
        if initrd != nil && kernel == nil { throw ValidationError("--initrd goes with --kernel") }
        switch (kernel, restore) {
        case (nil, nil): throw ValidationError("give --kernel FILE to boot, --restore FILE to resume a snapshot, or --incoming ADDRESS")
        case (.some, .some): throw ValidationError("--kernel and --restore exclude each other")
        case (nil, .some) where !cmdline.isEmpty: throw ValidationError("--cmdline cannot change a restored VM")
        case (nil, .some) where name != nil: throw ValidationError("--name cannot change a restored VM (it keeps the snapshot's)")
        default: break
        }
    }

    func run() throws {
        // A peer that resets a connection must be an error on that write, not the end of the process.
        signal(SIGPIPE, SIG_IGN)
        let logger = bootstrapLogging(level: logLevel)
        do {
            let size = try memory.map { try ByteSize(parsing: $0).bytes }
            let serialTarget = try SerialTarget(parsing: serial)
            let devices = try deviceSpecs()
            // The API socket is claimed first so that a path in use fails before any VM exists.
            let server = try apiSocket.map { try APIServer.bind(path: $0, logger: logger) }
            let machine: Machine
            do {
                if let incoming {
                    machine = try receiveMigration(from: try Endpoint(parsing: incoming), memory: size, serial: serialTarget,
                                                   server: server, logger: logger)
                } else if let restore {
                    let statistics: SnapshotStatistics
                    (machine, statistics) = try Machine.restoring(from: restore, expectedMemory: size, expectedVcpus: cpus,
                                                                  serial: serialTarget, kvmPath: kvmDevice, preallocate: prealloc,
                                                                  hugePages: hugePages, devices: devices.isEmpty ? nil : devices)
                    let megabytes = Double(statistics.fileBytes) / 1e6
                    logger.info("restored \(restore): \(String(format: "%.1f MB in %.3f s (%.0f MB/s)", megabytes, statistics.seconds, megabytes / max(statistics.seconds, 1e-9)))")
                } else {
                    var configuration = MachineConfiguration(
                        kernelPath: kernel, commandLine: cmdline, memorySize: size ?? 512 << 20, vcpuCount: cpus ?? 1,
                        serial: serialTarget, kvmPath: kvmDevice, preallocate: prealloc, hugePages: hugePages)
                    configuration.devices = devices
                    configuration.initrdPath = initrd
                    if let name { configuration.name = name }
                    machine = try Machine(configuration: configuration, logger: logger)
                }
            } catch {
                server?.shutdown()
                throw error
            }
            server?.attach(machine)
            // A signal that came while a migration was being received either ended the receive (then
            // we are not here) or came after it: it stops the VM it was too late to prevent.
            TerminationSignals.shared.onSignal(replaying: true) { signalNumber in
                // A host shutting down must not kill the only holder of pages a post-copy still owes: the
                // signal waits until the destination has all memory (or the migration ends otherwise).
                guard let server, !server.allowEnding() else {
                    machine.requestExit(MachineExit(kind: .quit, message: "stopped by signal \(signalNumber)"))
                    return
                }
                guard DeferredSignal.shared.defer() else {
                    logger.warning("signal \(signalNumber): still deferred until post-copy's memory is complete at the destination")
                    return
                }
                logger.warning("signal \(signalNumber) deferred: post-copy still owes the destination pages that exist only here; this process ends once its memory is complete there (SIGKILL would lose the VM)")
                _ = spawnThread(named: "deferred-signal") {
                    // A completed migration ends this process by itself once its report is sent; the signal
                    // is acted on only if the migration ends otherwise, after its answer has had time to go.
                    while server.holdsOwedPages || server.migrating { usleep(50_000) }
                    sleep(1)
                    logger.notice("the destination holds all memory: acting on the deferred signal \(signalNumber)")
                    machine.requestExit(MachineExit(kind: .quit, message: "stopped by signal \(signalNumber), deferred until post-copy's memory was complete"))
                }
            }
            machine.start(paused: paused) // no-op for a migrated VM, which is already running
            let exit = machine.waitForExit()
            server?.shutdown()
            if exit.isFailure {
                FileHandle.standardError.write(Data("tern: \(exit)\n".utf8))
                throw ExitCode(2)
            }
        } catch let error as ExitCode {
            throw error
        } catch is QuitWhileWaiting {
            logger.info("quit while waiting for an incoming migration")
            return
        } catch {
            FileHandle.standardError.write(Data("tern: \(error)\n".utf8))
            throw ExitCode.failure
        }
    }
}

extension Run {
    var hugePages: HugePages { HugePages(rawValue: thp) ?? .auto }
}

/// A descriptor number shared with a signal handler.
final class DescriptorBox: Sendable {
    private let stored = Mutex<Int32?>(nil)
    var value: Int32? {
        get { stored.withLock { $0 } }
        set { stored.withLock { $0 = newValue } }
    }
}

/// A termination signal put off while post-copy owes pages: acted on once, however many arrive.
final class DeferredSignal: Sendable {
    static let shared = DeferredSignal()
    private let pending = Atomic<Bool>(false)
    /// True for the first signal deferred; later ones only wait with it.
    func `defer`() -> Bool { !pending.exchange(true, ordering: .relaxed) }
}

/// `tern quit` on a destination that had not received a VM yet: a clean end, not an error.
struct QuitWhileWaiting: Error {}

extension Run {
    /// Waits for one migration and returns the running VM it delivered.
    /// SIGINT/SIGTERM while waiting abandon it cleanly (no VM ever ran).
    func receiveMigration(from endpoint: Endpoint, memory: UInt64?, serial: SerialTarget, server: APIServer?,
                          logger: Logger) throws -> Machine {
        let security = try ChannelSecurity.choose(tlsDirectory: tlsDir, allowedPeers: tlsAllow, insecure: insecure, for: endpoint,
                                                  role: .server).get()
        let authorizer = try requireToken.map { try TokenAuthorizer(publicKey: $0, ledger: tokenLedger ?? TokenAuthorizer.defaultLedger) }
        let listener = try endpoint.listen()
        defer { if case .unix(let path) = endpoint { unlink(path) } }
        var preparedMemory: GuestMemory?
        if prealloc, let memory {
            let started = ContinuousClock.now
            let prepared = try GuestMemory(size: memory, hugePages: hugePages)
            try prepared.preallocate()
            let milliseconds = (ContinuousClock.now - started).inSeconds * 1000
            logger.info("preallocated \(ByteSize(bytes: memory)) of guest RAM in \(String(format: "%.0f", milliseconds)) ms")
            preparedMemory = prepared
        }
        let connectionFD = DescriptorBox()
        TerminationSignals.shared.onSignal { _ in
            shutdown(listener.rawValue, Int32(SHUT_RDWR))
            if let fd = connectionFD.value { shutdown(fd, Int32(SHUT_RDWR)) }
        }
        let quitRequested = Atomic<Bool>(false)
        server?.setWaiting("waiting for an incoming migration on \(endpoint)") {
            quitRequested.store(true, ordering: .relaxed)
            shutdown(listener.rawValue, Int32(SHUT_RDWR))
        }
        logger.info("waiting for an incoming migration on \(endpoint)\(security.isEncrypted ? " (mutual TLS)" : "")\(authorizer != nil ? ", with a token" : "")")
        if case .tcp = endpoint, !security.isEncrypted {
            logger.warning("--insecure: a migration arrives in clear, and anyone who reaches \(endpoint) can hand this host a VM")
        }
        // The listener stays open for the source's extra page streams (`--streams`), then closes.
        let streamListener = StreamListener(
            accept: { try Endpoint.accept(listener, timeoutSeconds: $0) },
            close: { shutdown(listener.rawValue, Int32(SHUT_RDWR)) })
        defer { streamListener.close() }
        // A connection that fails TLS, or fails before a VM is built for it (garbage, a silent peer, a
        // refused hello), is turned away and the wait goes on: a stranger cannot end it. Handshakes run
        // side by side, so a stranger slow in its own cannot hold up the source's either.
        let incoming = try IncomingConnections(listener: listener, security: security) { error in
            logger.warning("refused a connection on \(endpoint): \(error); still waiting for the source")
        }
        defer { incoming.close() }
        while true {
            let control: Connection
            do {
                control = try incoming.next()
            } catch {
                if quitRequested.load(ordering: .relaxed) { throw QuitWhileWaiting() }
                throw ConfigurationError("stopped waiting for an incoming migration")
            }
            connectionFD.value = control.rawValue
            if let session = control.session { logger.info("the source is '\(session.peerName)' (\(session.version), \(session.cipher))") }
            let destination = MigrationDestination(
                expectations: .init(memorySize: memory, vcpuCount: cpus, serial: serial, kvmPath: kvmDevice, recoveryEndpoint: endpoint,
                                    hugePages: hugePages, security: security, devices: try deviceSpecs(), authorizer: authorizer),
                preparedMemory: preparedMemory, logger: logger)
            let machineBuilt = Atomic<Bool>(false)
            do {
                let (machine, outcome) = try destination.receive(on: control, listener: streamListener) {
                    machineBuilt.store(true, ordering: .relaxed)
                    incoming.close()
                    server?.attach($0)
                }
                logReceived(outcome, logger: logger)
                return machine
            } catch {
                guard !machineBuilt.load(ordering: .relaxed), !quitRequested.load(ordering: .relaxed) else { throw error }
                logger.warning("refused a connection on \(endpoint): \(error); still waiting for the source")
                connectionFD.value = nil
            }
        }
    }

    func logReceived(_ outcome: MigrationDestination.Outcome, logger: Logger) {
        let megabytes = Double(outcome.bytes) / 1e6
        logger.info("migration received: \(String(format: "%.1f MB, %llu data pages, %llu zero pages", megabytes, outcome.dataPages, outcome.zeroPages))\(outcome.downtimeMs.map { String(format: ", downtime %.1f ms", $0) } ?? "")\(outcome.tokenID.map { ", token \($0)" } ?? ""); \(outcome.paused ? "the VM is here now, paused as it was at the source (`tern resume` runs it)" : "the VM runs here now")")
    }
}

/// SIGINT/SIGTERM end the VM cleanly (socket removed, threads joined)
/// instead of killing the process mid-write. The signal sources are made
/// once per process and their action swapped as the process moves on
/// (waiting for a migration, then running the VM): a signal source made
/// again for a signal whose earlier source was cancelled never fires here.
final class TerminationSignals: @unchecked Sendable {
    // @unchecked Sendable: `sources` is set once in init and only kept alive; `action` is a Mutex.
    static let shared = TerminationSignals()
    private let action = Mutex<(@Sendable (Int32) -> Void)?>(nil)
    /// The first signal that arrived, if any (see `onSignal(replaying:)`).
    private let received = Mutex<Int32?>(nil)
    private let sources: [any DispatchSourceSignal]

    private init() {
        var sources: [any DispatchSourceSignal] = []
        for signalNumber in [SIGINT, SIGTERM] {
            signal(signalNumber, SIG_IGN)
            sources.append(DispatchSource.makeSignalSource(signal: signalNumber, queue: .global()))
        }
        self.sources = sources
        for (source, signalNumber) in zip(sources, [SIGINT, SIGTERM]) {
            source.setEventHandler { [unowned self] in
                received.withLock { $0 = $0 ?? signalNumber }
                action.withLock { $0 }?(signalNumber)
            }
            source.resume()
        }
    }

    /// What SIGINT and SIGTERM do from now on. With `replaying`, a signal that arrived
    /// before (e.g. just as a migration ended, after the waiting phase's action could still
    /// stop it) is handed to `body` at once, so it is never lost between two actions.
    func onSignal(replaying: Bool = false, _ body: @escaping @Sendable (Int32) -> Void) {
        action.withLock { $0 = body }
        if replaying, let earlier = received.withLock({ $0 }) { body(earlier) }
    }
}

func bootstrapLogging(level: String) -> Logger {
    let parsed = Logger.Level(rawValue: level) ?? .info
    LoggingSystem.bootstrap { label in
        var handler = StreamLogHandler.standardError(label: label)
        handler.logLevel = parsed
        return handler
    }
    return Logger(label: "tern")
}
