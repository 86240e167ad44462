import Foundation
import Glibc
import Logging
import TernDevices
import TernKVM
import TernMachine
import TernWire

/// The receiving side: accepts one migration, builds the VM it describes,
/// fills its memory round after round, loads its state, and starts it only
/// when the source commits. Until then nothing runs; any error ends the
/// migration with the VM never having executed an instruction here.
public final class MigrationDestination {
    /// What the user pinned on `tern run --incoming` (nil: take the source's).
    public struct Expectations: Sendable {
        public var memorySize: UInt64?
        public var vcpuCount: Int?
        public var serial: SerialTarget
        public var kvmPath: String
        /// Where to wait for the source if post-copy's connection drops (`tern migrate --resume`); nil: a drop fails the migration.
        public var recoveryEndpoint: Endpoint?
        /// Huge pages for the guest RAM (`--thp`); `auto` means 4 KiB pages for a post-copy from the start.
        public var hugePages: HugePages
        /// How connections are secured (also a post-copy's resumed connection).
        public var security: ChannelSecurity
        /// Where the VM's disks and NICs land here (`--disk id=NAME,path=FILE`, `--net id=NAME,tap=TAP`), by id:
        /// a source never chooses what a destination opens.
        public var devices: [DeviceSpec] = []
        /// Checks each migration's token (`--require-token`); nil: no token is asked for.
        public var authorizer: (any MigrationAuthorizer)?

        public init(memorySize: UInt64? = nil, vcpuCount: Int? = nil, serial: SerialTarget = .stdout, kvmPath: String = "/dev/kvm",
                    recoveryEndpoint: Endpoint? = nil, hugePages: HugePages = .auto, security: ChannelSecurity = .plaintext,
                    devices: [DeviceSpec] = [], authorizer: (any MigrationAuthorizer)? = nil) {
            self.authorizer = authorizer
            self.security = security
            self.devices = devices
            self.hugePages = hugePages
            self.recoveryEndpoint = recoveryEndpoint
            self.memorySize = memorySize
            self.vcpuCount = vcpuCount
            self.serial = serial
            self.kvmPath = kvmPath
        }
    }

    /// What the receiving side measured.
    public struct Outcome: Sendable {
        public var dataPages: UInt64
        public var zeroPages: UInt64
        public var bytes: UInt64
        public var downtimeMs: Double?
        /// The VM came paused (it was paused at the source) and stays so until resumed here.
        public var paused = false
        /// The id of the token that authorized the migration (`--require-token`).
        public var tokenID: String?
    }

    public struct Refusal: Error, CustomStringConvertible {
        public let description: String
        init(_ description: String) { self.description = description }
    }

    let expectations: Expectations
    let logger: Logger
    /// Guest RAM prepared (preallocated) while waiting, used if the VM that arrives has its size.
    let preparedMemory: GuestMemory?
    static let maximumStateBytes: UInt64 = 16 << 20
    /// Devices this tern can restore, by state tag.
    static let knownDevices: Set<String> = ["UART", "virtio-blk", "virtio-net"]
    /// Fault injection for tests of the source's guarantees (docs/MIGRATION.md, "Guarantees").
    static let injectedFault = ProcessInfo.processInfo.environment["TERN_MIGRATION_FAULT"]

    public init(expectations: Expectations, preparedMemory: GuestMemory? = nil, logger: Logger = Logger(label: "tern.incoming")) {
        self.preparedMemory = preparedMemory
        self.expectations = expectations
        self.logger = logger
    }

    /// Runs the protocol on an accepted connection. `machineCreated` is
    /// called as soon as the VM exists (paused, empty), e.g. to serve its API.
    /// Returns the started machine.
    /// `listener` accepts the source's extra page streams (`--streams`), if it asks for any.
    public func receive(on socket: Connection, listener: StreamListener? = nil,
                        machineCreated: (Machine) -> Void = { _ in }) throws -> (Machine, Outcome) {
        let stream = socket.stream
        // Every wait on the source is bounded until the hand-over (post-copy lifts this for its own reads).
        setTimeouts(socket.rawValue, seconds: MigrationSource.replyTimeoutSeconds)
        do {
            return try receive(from: stream, replyTo: stream, connection: socket, listener: listener,
                               machineCreated: machineCreated)
        } catch {
            // Tell the source why, if it still listens; it keeps its VM.
            try? stream.writeFrame(.abort, payload: Array("\(error)".utf8))
            throw error
        }
    }

    /// The protocol proper, over any byte source (tests feed it buffers).
    /// `connection` is kept open for as long as post-copy still needs it.
    public func receive(from source: some ByteSource, replyTo sink: FDStream?, connection: Connection? = nil,
                        listener: StreamListener? = nil,
                        machineCreated: (Machine) -> Void = { _ in }) throws -> (Machine, Outcome) {
        var extraStreams: PageStreamReceivers?
        var storageTargets: StorageTargets?
        var mirror: StorageMirrorReceiver?
        do {
            return try receive(from: source, replyTo: sink, connection: connection, listener: listener,
                               extraStreams: &extraStreams, storageTargets: &storageTargets, mirror: &mirror, machineCreated: machineCreated)
        } catch {
            // A partly received disk is deleted: it must never be taken for a complete one.
            storageTargets?.discard()
            mirror?.cancel()
            if let failure = mirror?.failed, failure != "cancelled" { throw Refusal(failure) }
            // A failed page stream cut the control connection: its error is the one that explains.
            extraStreams?.cancel()
            if let failure = extraStreams?.failure, failure != "cancelled" { throw Refusal(failure) }
            throw error
        }
    }

    private func receive(from source: some ByteSource, replyTo sink: FDStream?, connection: Connection?,
                         listener: StreamListener?, extraStreams: inout PageStreamReceivers?, storageTargets: inout StorageTargets?,
                         mirror: inout StorageMirrorReceiver?, machineCreated: (Machine) -> Void) throws -> (Machine, Outcome) {
        // 1. Hello: is this a Tern source, and can this host run its machine?
        let (helloHeader, helloPayload) = try source.readFrame()
        guard helloHeader.type == .hello else {
            throw Refusal("the peer is not a Tern migration source (first frame is \(helloHeader.type))")
        }
        let hello: Hello
        do { hello = try Hello(decoding: helloPayload) } catch {
            // A Tern of another protocol version gets its answer in the reply it waits for; garbage gets none.
            if case .unsupportedVersion = error {
                try? sink?.writeFrame(.helloReply, payload: Verdict(accepted: false, reason: "\(error)", bootID: Clocks.bootID).encoded)
            }
            throw Refusal("bad hello: \(error)")
        }
        let machine: Machine
        let streams = Int(hello.streams)
        let tokenID: String?
        do {
            // A source without the right token learns nothing about this host beyond the refusal.
            tokenID = try expectations.authorizer.map { try $0.authorize(token: hello.authorization, vm: hello.machine.name, over: connection) }
            try check(hello)
            if (streams > 1 || hello.features & (Hello.postcopyUrgentFeature | Hello.syncMirrorFeature) != 0) && listener == nil {
                throw Refusal("parallel page streams need a listening socket")
            }
            if hello.features & Hello.syncMirrorFeature != 0 && (hello.storage.mode != .copy || hello.storage.disks.isEmpty) {
                throw Refusal("a synchronous disk mirror needs --storage copy and a disk")
            }
            // Post-copy from the start takes 4 KiB pages unless told otherwise (`--thp on`): on memory the host
            // had not backed yet it measured nearly three times as slow into huge pages. A hybrid or auto
            // migration sends most pages by pre-copy, which huge pages speed up (docs/MIGRATION.md, "Huge pages").
            let postcopyFromTheStart = hello.features & Hello.postcopyFirstFeature != 0
            // Huge pages in post-copy are placed by minor faults; without them (before Linux 5.14), 4 KiB pages.
            let postcopyWithoutMinorFaults = hello.features & Hello.postcopyUrgentFeature != 0 && !Userfaultfd.minorFaultsAvailable
            if postcopyWithoutMinorFaults {
                if expectations.hugePages == .on { throw Refusal("--thp on: post-copy into huge pages needs userfaultfd minor faults (Linux 5.14)") }
                if preparedMemory?.usesHugePages == true { throw Refusal("post-copy into the prepared huge pages needs userfaultfd minor faults (Linux 5.14)") }
            }
            let fourKiBPages = postcopyFromTheStart || postcopyWithoutMinorFaults
            var configuration = MachineConfiguration(
                kernelPath: nil, commandLine: hello.machine.commandLine, memorySize: hello.machine.memorySize,
                vcpuCount: Int(hello.machine.vcpuCount), serial: expectations.serial, kvmPath: expectations.kvmPath,
                hugePages: fourKiBPages && expectations.hugePages == .auto ? .off : expectations.hugePages)
            configuration.bootedKernel = hello.machine.kernelPath.isEmpty ? nil : hello.machine.kernelPath
            if !hello.machine.name.isEmpty { configuration.name = hello.machine.name }
            configuration.devices = try Self.devices(for: hello.machine.devices, here: expectations.devices)
            switch hello.storage.mode {
            case .copy where !hello.storage.disks.isEmpty:
                let (targets, devices) = try StorageTargets.prepare(hello.storage, devices: configuration.devices)
                storageTargets = targets
                configuration.devices = devices
            case .copy, .shared:
                // Shared storage: the source still writes the image; it is locked here once the source lets go.
                configuration.diskLocking = .deferred
            }
            machine = try Machine(configuration: configuration, memory: preparedMemory, logger: logger)
            // Post-copy from the start into preallocated memory: unmap it now, before the source
            // pauses, so that the switch need not (its pages then wait for their contents by minor faults).
            if postcopyFromTheStart && machine.memory.isPreallocated { try machine.memory.unmapAll() }
        } catch {
            try sink?.writeFrame(.helloReply, payload: Verdict(accepted: false, reason: "\(error)", bootID: Clocks.bootID).encoded)
            throw Refusal("refused the incoming VM: \(error)")
        }
        let token = UInt64.random(in: 1...UInt64.max)
        try sink?.writeFrame(.helloReply, payload: Verdict(accepted: true, bootID: Clocks.bootID, token: token, tokenID: tokenID ?? "").encoded)
        machineCreated(machine)
        let compressed = hello.features & Hello.zstdFeature != 0
        let storage = storageTargets.map { targets in
            StorageReceiver(targets: targets, images: targets.targets.compactMap { target in
                (machine.devices.devices.first { $0.id == target.id }?.backend as? VirtioBlock)?.image
            }, verify: hello.features & Hello.verifyFeature != 0)
        }
        // --verify: the memory digest is kept as pages land, so the end need not read all RAM in the downtime.
        let digests = hello.features & Hello.verifyFeature != 0 ? PageDigests(pageCount: Int(machine.memory.size / UInt64(PageRun.pageSize))) : nil
        var urgentConnection: Connection?
        let wantsUrgent = hello.features & Hello.postcopyUrgentFeature != 0
        let wantsMirror = hello.features & Hello.syncMirrorFeature != 0
        if streams > 1 || wantsUrgent || wantsMirror, let listener {
            let accepted = try PageStreamReceivers.acceptConnections(streams: streams, urgent: wantsUrgent, mirror: wantsMirror, token: token,
                                                                     security: expectations.security, accept: listener.accept)
            if streams > 1 {
                extraStreams = PageStreamReceivers(connections: accepted.pages, memory: machine.memory,
                                                   controlConnection: connection, decompress: compressed, digests: digests)
                // Likewise the control stream, which carries only stream 0's share of the pages.
                if let connection { setTimeouts(connection.rawValue, seconds: 0) }
            }
            urgentConnection = accepted.urgent
            if let mirrorConnection = accepted.mirror, let storage {
                // Blocks may take a while to come (a guest that writes nothing): no read timeout.
                setTimeouts(mirrorConnection.rawValue, seconds: 0)
                mirror = StorageMirrorReceiver(connection: mirrorConnection, storage: storage, controlConnection: connection)
            }
        }
        // One migration per process: from here other connections are refused rather than queued.
        listener?.close()

        // 2. Pages (any number of rounds), then state sections, then the end.
        let applier = PageRunApplier(memory: machine.memory, delivery: .repeated)
        applier.decompressionAllowed = compressed
        applier.digests = digests
        if streams > 1 { applier.stream = (StreamPartition(streams: streams), 0) }
        var sections: [StateSection] = []
        var stateBytes: UInt64 = 0
        var bytes = UInt64(FrameHeader.size + helloPayload.count)
        var completion: Completion?
        var postcopyNeeded: PageSet?
        var extraCovered: UInt64 = 0
        while completion == nil {
            let header = try source.readFrameHeader()
            bytes += UInt64(FrameHeader.size) + header.length
            switch header.type {
            case .pages:
                guard sections.isEmpty else { throw Refusal("memory arrived after the VM state") }
                try applier.apply(header, from: source)
            case .blocks:
                guard let storage else { throw Refusal("disk blocks arrived, but the migration's storage is not copied") }
                guard mirror == nil else { throw Refusal("disk blocks arrived on the control connection of a synchronous mirror") }
                guard sections.isEmpty else { throw Refusal("disk blocks arrived after the VM state") }
                try storage.apply(header, from: source)
            case .state:
                // A VM's state is tens of KiB per vCPU: cap what a hostile source can make us hold.
                stateBytes += header.length
                guard sections.count < 1024, stateBytes <= Self.maximumStateBytes else { throw Refusal("too much VM state (\(stateBytes) bytes)") }
                let payload = try source.readExactly(Int(header.length), what: "state frame")
                try source.checkPayload(payload, of: header, what: "state frame")
                sections.append(try StateSection(decoding: payload))
            case .end:
                extraCovered = try extraStreams?.join() ?? 0
                try mirror?.join()
                let payload = try source.readExactly(Int(header.length), what: "end frame")
                try source.checkPayload(payload, of: header, what: "end frame")
                completion = try Completion(decoding: payload)
            case .postcopyStart:
                extraCovered = try extraStreams?.join() ?? 0
                try mirror?.join()
                let payload = try source.readExactly(Int(header.length), what: "post-copy start")
                try source.checkPayload(payload, of: header, what: "post-copy start frame")
                let start = try PostcopyStart(decoding: payload, pageCount: Int(machine.memory.size / UInt64(PageRun.pageSize)))
                completion = start.completion
                postcopyNeeded = start.needed
            case .ping:
                // The latency probe before the pages, and each round's sync: answered once everything before it is applied.
                guard sections.isEmpty, header.length <= 64 else { throw Refusal("unexpected ping") }
                let payload = try source.readExactly(Int(header.length), what: "ping")
                try source.checkPayload(payload, of: header, what: "ping frame")
                try storage?.flushRound()
                try sink?.writeFrame(.pong, payload: payload)
            case .abort:
                let payload = try source.readExactly(Int(header.length), what: "abort frame")
                throw Refusal("the source aborted: \(String(decoding: payload, as: UTF8.self))")
            default:
                throw Refusal("unexpected \(header.type) frame during the transfer")
            }
        }
        guard let completion else { throw Refusal("no end frame") }
        let sinceSourcePaused = { hello.bootID == Clocks.bootID ? "\(Int(Clocks.milliseconds(from: completion.pausedMonotonicNs, to: Clocks.monotonicNs()))) ms" : "?" }
        logger.debug("the end frame arrived \(sinceSourcePaused()) after the source paused")

        // Fault injection for tests of the source's guarantees (docs/MIGRATION.md).
        if Self.injectedFault == "die-before-ready" {
            logger.warning("TERN_MIGRATION_FAULT=die-before-ready: exiting abruptly")
            kill(getpid(), SIGKILL)
        }

        // 3. Everything is here (or, for post-copy, listed): check it, load it, answer with our own digests.
        // A refusal here is sent as a rejecting `ready`, so the source's report says why, not just that we went.
        var ready = Verdict(accepted: true, bootID: Clocks.bootID)
        var postcopy: PostcopyReceiver?
        do {
            if postcopyNeeded == nil {
                let missing = machine.memory.size / UInt64(PageRun.pageSize) - applier.coveredPages - extraCovered
                guard missing == 0 else { throw Refusal("\(missing) pages of guest RAM never arrived") }
            }
            let state = try MachineStateSnapshot(sections: sections)
            guard state.description.memorySize == hello.machine.memorySize, state.description.vcpuCount == hello.machine.vcpuCount else {
                throw Refusal("the VM state does not match the machine announced in the hello")
            }
            try machine.restoreState(state)
            logger.debug("the VM state was loaded \(sinceSourcePaused()) after the source paused")
            if let storage {
                try storage.flush()
                if completion.memoryDigest != nil { ready.diskDigests = storage.digests() }
                if Self.injectedFault == "wrong-disk-digest" { ready.diskDigests = ready.diskDigests.map { $0 ^ 1 } }
                logger.debug("the disks were flushed \(sinceSourcePaused()) after the source paused")
            }
            if Self.injectedFault == "reject-state" { throw Refusal("TERN_MIGRATION_FAULT=reject-state: the VM state is refused") }
            if let needed = postcopyNeeded {
                guard let stream = sink else { throw Refusal("post-copy needs a two-way connection") }
                // With --verify: the digest of the pages already here; arriving pages add theirs.
                let present = completion.memoryDigest == nil ? nil
                    : try digests?.digest { !needed.contains($0) } ?? MemoryDigest.compute(machine.memory) { !needed.contains($0) }
                postcopy = try PostcopyReceiver(machine: machine, source: stream, connection: connection, expected: needed,
                                                digestOfPresentPages: present, urgent: urgentConnection,
                                                pushStreams: extraStreams?.connections ?? [],
                                                recovery: expectations.recoveryEndpoint, security: expectations.security, token: token,
                                                afterPrecopy: hello.features & Hello.postcopyFirstFeature == 0, logger: logger)
                if completion.memoryDigest != nil { ready.stateDigest = MemoryDigest.state(sections) }
                logger.debug("post-copy's userfaultfd was ready \(sinceSourcePaused()) after the source paused")
            } else if completion.memoryDigest != nil {
                ready.memoryDigest = try digests?.digest() ?? MemoryDigest.compute(machine.memory)
                ready.stateDigest = MemoryDigest.state(sections)
                if Self.injectedFault == "wrong-memory-digest" { ready.memoryDigest = ready.memoryDigest.map { $0 ^ 1 } }
            }
        } catch {
            try? sink?.writeFrame(.ready, payload: Verdict(accepted: false, reason: "\(error)", bootID: Clocks.bootID).encoded)
            throw error
        }
        try sink?.writeFrame(.ready, payload: ready.encoded)
        logger.debug("ready sent \(sinceSourcePaused()) after the source paused")

        // 4. Start only on the source's commit.
        let (goHeader, goPayload) = try source.readFrame()
        if goHeader.type == .abort {
            throw Refusal("the source aborted: \(String(decoding: goPayload, as: UTF8.self))")
        }
        guard goHeader.type == .go else { throw Refusal("expected the source's go-ahead, got a \(goHeader.type) frame") }
        if Self.injectedFault == "die-after-go" {
            logger.warning("TERN_MIGRATION_FAULT=die-after-go: exiting abruptly")
            kill(getpid(), SIGKILL)
        }
        let keepPaused = try Go(decoding: goPayload).keepPaused
        if let storage {
            // The source committed: the received images take their names.
            for failure in storage.targets.commit(images: storage.disks.map(\.image)) { logger.error("\(failure); the VM runs on the partial image") }
        } else {
            try lockSharedDisks(of: machine)
        }
        // Where the VM is now: switches on the way learn its MACs behind this host (a VM kept paused is not announced).
        if !keepPaused { NetworkAnnouncer.start(for: machine, schedule: hello.announce, logger: logger) }
        // The VM may have been quit meanwhile (through its API): then it must not be reported as running.
        guard machine.start(paused: keepPaused) else { throw Refusal("the VM was stopped here before it could start") }
        let resumed = Resumed(monotonicNs: Clocks.monotonicNs(), realtimeNs: Clocks.realtimeNs())
        // The VM runs now whatever happens to this last message: the source may not run it too.
        try? sink?.writeFrame(.resumed, payload: resumed.encoded)
        postcopy?.start(vmStartedNs: resumed.monotonicNs)
        let downtime = hello.bootID == Clocks.bootID ? Clocks.milliseconds(from: completion.pausedMonotonicNs, to: resumed.monotonicNs) : nil
        return (machine, Outcome(dataPages: applier.dataPages + (extraStreams?.dataPages ?? 0),
                                 zeroPages: applier.zeroPages + (extraStreams?.zeroPages ?? 0), bytes: bytes, downtimeMs: downtime,
                                 paused: keepPaused, tokenID: tokenID))
    }

    /// Shared storage: the source let go of the images just before its `go`; take them (a few tries, in
    /// case its unlock is still on its way through its kernel).
    private func lockSharedDisks(of machine: Machine) throws {
        let deadline = ContinuousClock.now + .seconds(5)
        while true {
            do {
                try machine.devices.lockDisks()
                return
            } catch {
                guard ContinuousClock.now < deadline else {
                    throw Refusal("\(error): the source has not let go of its disk; the VM does not start here")
                }
                Thread.sleep(forTimeInterval: 0.01)
            }
        }
    }

    /// The VM's devices as this destination opens them: each one the VM has must be named here by
    /// id and kind (the path or TAP is this host's choice); the MAC and read-only flag are the VM's.
    static func devices(for announced: [DeviceSpec], here: [DeviceSpec]) throws -> [DeviceSpec] {
        for local in here where !announced.contains(where: { $0.id == local.id }) {
            throw Refusal("device '\(local.id)' is configured here, but the VM has no such device")
        }
        return try announced.map { device in
            switch (device, here.first { $0.id == device.id }) {
            case (.disk(let disk), .disk(var local)?):
                guard !local.readOnly || disk.readOnly else {
                    throw Refusal("the VM's disk '\(disk.id)' is writable; --disk id=\(disk.id) here says readonly=on")
                }
                local.readOnly = disk.readOnly
                return .disk(local)
            case (.network(let network), .network(var local)?):
                local.mac = network.mac
                return .network(local)
            case (.disk(let disk), _):
                throw Refusal("the VM has a disk '\(disk.id)': name where it lands here with --disk id=\(disk.id),path=FILE")
            case (.network(let network), _):
                throw Refusal("the VM has a NIC '\(network.id)' (MAC \(network.mac)): name its TAP here with --net id=\(network.id),tap=NAME")
            }
        }
    }

    /// Can this host run the announced machine?
    private func check(_ hello: Hello) throws {
        if let memory = expectations.memorySize, memory != hello.machine.memorySize {
            throw Refusal("the source VM has \(ByteSize(bytes: hello.machine.memorySize)) of RAM; this destination was started with --memory \(ByteSize(bytes: memory))")
        }
        if let vcpus = expectations.vcpuCount, vcpus != Int(hello.machine.vcpuCount) {
            throw Refusal("the source VM has \(hello.machine.vcpuCount) vCPUs; this destination was started with --cpus \(vcpus)")
        }
        // Without --memory/--cpus the limits are what the host has: checked before anything is allocated.
        if expectations.memorySize == nil, preparedMemory == nil, let available = HostResources.availableMemory(),
           hello.machine.memorySize > available {
            throw Refusal("the source VM has \(ByteSize(bytes: hello.machine.memorySize)) of RAM; this host has \(ByteSize(bytes: available)) available")
        }
        if expectations.vcpuCount == nil, Int(hello.machine.vcpuCount) > HostResources.processors {
            throw Refusal("the source VM has \(hello.machine.vcpuCount) vCPUs; this host has \(HostResources.processors) processors")
        }
        let unknown = Set(hello.devices).subtracting(Self.knownDevices)
        guard unknown.isEmpty else { throw Refusal("devices this tern cannot restore: \(unknown.sorted().joined(separator: ", "))") }
        let supported = try Kvm(path: expectations.kvmPath).supportedCPUID()
        if let missing = CPUCompatibility.missingFeatures(guest: hello.cpuid, host: supported) {
            throw Refusal("this host's KVM lacks CPU features the guest uses: \(missing)")
        }
    }
}

/// A destination's check that a migration is authorized (`tern run --incoming ... --require-token KEY`).
/// The token rides in the hello, inside the TLS channel; the extra page streams, the demand channel and a
/// post-copy resume join with the session token the hello's reply hands out over that authenticated channel.
public protocol MigrationAuthorizer: Sendable {
    /// Returns the id of `token` if it authorizes moving VM `vm` here from the peer of `connection`;
    /// throws the reason the source is told otherwise. Called on the destination's own thread.
    func authorize(token: String, vm: String, over connection: Connection?) throws -> String
}

/// Where a destination accepts the source's extra page streams, and how it stops accepting.
public struct StreamListener {
    /// Accepts one connection within the given number of seconds, or throws.
    public var accept: (_ timeoutSeconds: Int) throws -> FileDescriptor
    public var close: () -> Void

    public init(accept: @escaping (_ timeoutSeconds: Int) throws -> FileDescriptor, close: @escaping () -> Void) {
        self.accept = accept
        self.close = close
    }
}

/// Whether a guest's CPUID can be offered by another host's KVM.
public enum CPUCompatibility {
    /// Leaves whose registers are feature bit masks (a guest may rely on any set bit).
    static var featureLeaves: [(function: UInt32, index: UInt32, registers: [KeyPath<CPUIDEntry, UInt32>], name: String)] { [
        (1, 0, [\.ecx, \.edx], "leaf 1"),
        (7, 0, [\.ebx, \.ecx, \.edx], "leaf 7"),
        (0x8000_0001, 0, [\.ecx, \.edx], "leaf 0x80000001"),
        (0xD, 1, [\.eax], "leaf 0xD.1"),
    ] }

    /// nil when every feature bit the guest sees is supported; otherwise a description of what is missing.
    public static func missingFeatures(guest: [CPUIDEntry], host: [CPUIDEntry]) -> String? {
        var missing: [String] = []
        for leaf in featureLeaves {
            guard let g = guest.first(where: { $0.function == leaf.function && $0.index == leaf.index }) else { continue }
            let h = host.first { $0.function == leaf.function && $0.index == leaf.index }
            for (i, register) in leaf.registers.enumerated() {
                var bits = g[keyPath: register] & ~(h?[keyPath: register] ?? 0)
                // Bits Tern sets itself (hypervisor present, leaf 1 ECX bit 31) and the OSXSAVE/APIC-ID-like mirrors are not host features.
                if leaf.function == 1 && i == 0 { bits &= ~(UInt32(1) << 31 | UInt32(1) << 27) }
                if bits != 0 { missing.append("\(leaf.name) register \(i) bits 0x\(String(bits, radix: 16))") }
            }
        }
        return missing.isEmpty ? nil : missing.joined(separator: "; ")
    }
}
