import Foundation
import Glibc
import Synchronization
import Testing
import TernKVM
import TernMachine
import TernWire
@testable import TernMigration

/// A hostile post-copy source: after the hand-over it sends pages the
/// destination must refuse. The destination pauses its VM and aborts.
@Suite(.serialized, .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
struct PostcopyReceiverTests {
    let receiverTests = ReceiverTests()

    init() {
        // A destination that ends early closes its end: a write must fail, not kill the test process.
        signal(SIGPIPE, SIG_IGN)
    }

    /// Both ways of placing pages: UFFDIO_COPY into 4 KiB pages, and (where a private tmpfs can be
    /// mounted) writes into the file mapped by UFFDIO_CONTINUE, with missing and minor faults.
    static let pageKinds: [HugePages] = [.off, .on].filter { (try? GuestMemory(size: 16 << 20, hugePages: $0)) != nil }

    /// Runs a destination on one end of a socket pair; returns the other end, already past `resumed`.
    /// A connected socket pair: the test's end first, the destination's second.
    func socketPair() -> (FileDescriptor, FileDescriptor) {
        var fds: [Int32] = [0, 0]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0)
        setTimeouts(fds[0], seconds: 30)   // a destination that stalls fails the test, never hangs it
        return (FileDescriptor(adopting: fds[0]), FileDescriptor(adopting: fds[1]))
    }

    /// Runs a destination on `theirs`; `pushStream` is the one extra page stream its listener hands out.
    func startDestination(on theirs: FileDescriptor, pushStream: FileDescriptor? = nil, hugePages: HugePages) -> ResultHolder {
        let holder = ResultHolder()
        spawnThread(named: "destination") {
            let listener = pushStream.map { stream in StreamListener(accept: { _ in stream }, close: {}) }
            do {
                let (machine, _) = try MigrationDestination(expectations: .init(serial: .off, hugePages: hugePages))
                    .receive(on: Connection(descriptor: theirs), listener: listener)
                holder.set(machine)
            } catch {
                holder.fail("\(error)")
            }
        }
        return holder
    }

    func handOver(needed extraPages: Int..., hugePages: HugePages = .off) throws -> (FDStream, FileDescriptor, ResultHolder) {
        let (ours, theirs) = socketPair()
        let holder = startDestination(on: theirs, hugePages: hugePages)
        let s = try receiverTests.stream()
        let stream = FDStream(fd: ours.rawValue)
        // Hello; the memory as pre-copy would have left it; the state; then post-copy with one page still needed.
        try stream.writeAll(s.hello)
        #expect(try stream.readFrame().0.type == .helloReply)
        try stream.writeAll(s.pages + s.state)
        var needed = PageSet(pageCount: (16 << 20) / 4096)
        for page in extraPages { needed.insert(page) }
        let start = PostcopyStart(completion: Completion(pausedMonotonicNs: Clocks.monotonicNs(), pausedRealtimeNs: 0,
                                                         memoryDigest: nil, stateDigest: nil), needed: needed)
        try stream.writeFrame(.postcopyStart, payload: start.encoded)
        #expect(try stream.readFrame().0.type == .ready)
        try stream.writeFrame(.go, payload: [UInt8]())
        #expect(try stream.readFrame().0.type == .resumed)
        return (stream, ours, holder)
    }

    /// Like `handOver`, for a source with two page streams (`--streams 2`): pre-copy's pages go on the
    /// stream their 1 MiB chunk belongs to; the second stream is returned to push post-copy pages on.
    func handOverWithPushStream(needed target: Int) throws -> (control: FDStream, push: FDStream, sockets: [FileDescriptor], ResultHolder) {
        let (ours, theirs) = socketPair(), (ourPush, theirPush) = socketPair()
        let holder = startDestination(on: theirs, pushStream: theirPush, hugePages: .off)
        let machine = try Machine(configuration: MachineConfiguration(kernelPath: ReceiverTests.guest, commandLine: "progress=0",
                                                                      memorySize: 16 << 20, serial: .off))
        let state = try machine.captureState()
        let control = FDStream(fd: ours.rawValue), push = FDStream(fd: ourPush.rawValue)
        let hello = Hello(bootID: "test", machine: state.description, cpuid: machine.guestCPUID, devices: ["UART"], streams: 2)
        try control.writeFrame(.hello, payload: hello.encoded)
        let (_, reply) = try control.readFrame()
        try push.writeFrame(.streamHello, payload: StreamHello(token: try Verdict(decoding: reply).token, index: 1).encoded)
        // Every 1 MiB chunk whole, on its stream (even chunks on the control connection, odd ones on the other).
        for chunk in 0..<16 {
            let address = GuestAddress(UInt64(chunk) << 20)
            let bytes = try machine.memory.read(address, count: 1 << 20)
            try (chunk % 2 == 0 ? control : push).writeAll(receiverTests.pagesFrame([(PageRun(address: address, pageCount: 256, kind: .data), bytes)]))
        }
        for section in state.sections { try control.writeFrame(.state, payload: section.encoded) }
        try push.writeFrame(.streamEnd, payload: [UInt8]())
        var needed = PageSet(pageCount: (16 << 20) / 4096)
        needed.insert(target)
        let start = PostcopyStart(completion: Completion(pausedMonotonicNs: Clocks.monotonicNs(), pausedRealtimeNs: 0,
                                                         memoryDigest: nil, stateDigest: nil), needed: needed)
        try control.writeFrame(.postcopyStart, payload: start.encoded)
        #expect(try control.readFrame().0.type == .ready)
        try control.writeFrame(.go, payload: [UInt8]())
        #expect(try control.readFrame().0.type == .resumed)
        return (control, push, [ours, ourPush], holder)
    }

    /// A page pushed on the second stream is placed there; each stream's end, then the control
    /// connection's, and the destination reports all memory here.
    @Test func pagesPushedOnAnExtraStreamArePlaced() throws {
        let target = 0x900
        let (control, push, sockets, holder) = try handOverWithPushStream(needed: target)
        try push.writeAll(page(target))
        try push.writeFrame(.postcopyEnd, payload: [UInt8]())
        try control.writeFrame(.postcopyEnd, payload: [UInt8]())
        while true {
            let (header, payload) = try control.readFrame()
            #expect(header.type != .abort, "\(String(decoding: payload, as: UTF8.self))")
            if header.type == .abort { break }
            guard header.type == .complete else { continue }
            let statistics = try PostcopyStatistics(decoding: payload)
            #expect(statistics.pagesPushed == 1)
            break
        }
        let deadline = Date(timeIntervalSinceNow: 10)
        while holder.machine == nil && Date() < deadline { usleep(10_000) }
        let machine = try #require(holder.machine)
        #expect(try machine.memory.read(GuestAddress(UInt64(target) * 4096), count: 4096) == [UInt8](repeating: 0x77, count: 4096))
        expectEnds(machine)
        withExtendedLifetime(sockets) {}
    }

    /// Demand replies have their own channel (or the control connection): on a push stream one is refused.
    @Test func aDemandReplyOnAPushStreamStopsTheVM() throws {
        let target = 0x901
        let (control, push, sockets, holder) = try handOverWithPushStream(needed: target)
        try push.writeAll(page(target, flags: demandReplyFlag))
        #expect(try abortReason(control).contains("a demand reply on a push stream"))
        expectPausedAndStopped(holder)
        withExtendedLifetime(sockets) {}
    }

    func page(_ index: Int, flags: UInt32 = 0) -> [UInt8] {
        let run = PageRun(address: GuestAddress(UInt64(index) * 4096), pageCount: 1, kind: .data)
        let payload = run.encodedHeader + [UInt8](repeating: 0x77, count: 4096)
        return FrameHeader(type: .pages, flags: flags, length: UInt64(payload.count), payloadCRC: Checksum.crc32c(payload)).encoded + payload
    }

    /// A page of the guest's kernel image as the source would send it (the vCPU runs it).
    func kernelPage(_ index: Int, flags: UInt32 = 0) throws -> [UInt8] {
        let machine = try Machine(configuration: MachineConfiguration(kernelPath: ReceiverTests.guest, commandLine: "progress=0",
                                                                      memorySize: 16 << 20, serial: .off))
        let run = PageRun(address: GuestAddress(UInt64(index) * 4096), pageCount: 1, kind: .data)
        let payload = run.encodedHeader + (try machine.memory.read(GuestAddress(UInt64(index) * 4096), count: 4096))
        return FrameHeader(type: .pages, flags: flags, length: UInt64(payload.count), payloadCRC: Checksum.crc32c(payload)).encoded + payload
    }

    /// Reads until the destination's abort and returns its reason.
    func abortReason(_ stream: FDStream) throws -> String {
        while true {
            let (header, payload) = try stream.readFrame()
            if header.type == .abort { return String(decoding: payload, as: UTF8.self) }
        }
    }

    func expectPausedAndStopped(_ holder: ResultHolder) {
        let deadline = Date(timeIntervalSinceNow: 10)
        while holder.machine?.currentState != .paused && Date() < deadline { usleep(10_000) }
        #expect(holder.machine?.currentState == .paused, "the VM is paused, not running on bad memory")
        expectEnds(holder.machine)
    }

    /// CPU time (user + system, in clock ticks) a thread of this process has used.
    func cpuTicks(ofThread id: Int32) -> Int? {
        guard let stat = try? String(contentsOfFile: "/proc/self/task/\(id)/stat", encoding: .utf8),
              let afterName = stat.range(of: ") ", options: .backwards) else { return nil }
        // Fields from the third (state) on; utime and stime are the 14th and 15th.
        let fields = stat[afterName.upperBound...].split(separator: " ")
        guard fields.count > 12, let user = Int(fields[11]), let system = Int(fields[12]) else { return nil }
        return user + system
    }

    @Test(arguments: pageKinds)
    func aPageSentTwiceStopsTheVM(hugePages: HugePages) throws {
        let target = 0x800
        let (stream, socket, holder) = try handOver(needed: target, hugePages: hugePages)
        try stream.writeAll(page(target))
        try stream.writeAll(page(target))
        #expect(try abortReason(stream).contains("sent twice"))
        expectPausedAndStopped(holder)
        withExtendedLifetime(socket) {}
    }

    /// Waits for the destination's request for `page` (a vCPU waits for it).
    func awaitRequest(for page: Int, on stream: FDStream) throws {
        while true {
            let (header, payload) = try stream.readFrame()
            if header.type == .pageRequest, try PageRequest(decoding: payload).pages.contains(UInt64(page)) { return }
        }
    }

    /// The source sends a requested page again on the demand channel when its pushed copy
    /// may still be on the way: the first copy is placed, the second dropped, and the VM runs on.
    @Test(arguments: pageKinds)
    func aRequestedPageMayArriveTwice(hugePages: HugePages) throws {
        let entryPage = 0x100000 / 4096, other = 0x900
        let (stream, socket, holder) = try handOver(needed: entryPage, other, hugePages: hugePages)
        try awaitRequest(for: entryPage, on: stream)
        try stream.writeAll(kernelPage(entryPage))
        try stream.writeAll(kernelPage(entryPage, flags: demandReplyFlag))
        try stream.writeAll(page(other))
        try stream.writeFrame(.postcopyEnd, payload: [UInt8]())
        var statistics: PostcopyStatistics?
        while statistics == nil {
            let (header, payload) = try stream.readFrame()
            #expect(header.type != .abort, "\(String(decoding: payload, as: UTF8.self))")
            if header.type == .abort { break }
            if header.type == .complete { statistics = try PostcopyStatistics(decoding: payload) }
        }
        let s = try #require(statistics)
        #expect(s.secondCopiesDropped == 1)
        #expect(s.pagesPushed + s.pagesPulled == 2, "each needed page counted once")
        #expect(holder.machine?.currentState == .running)
        #expect(holder.machine?.memory.usesHugePages == (hugePages == .on), "placed the way this case tests")
        expectEnds(holder.machine)
        withExtendedLifetime(socket) {}
    }

    /// Minor-fault placement (huge pages): a placed page whose mapping the kernel drops (reclaim or
    /// khugepaged may; here MADV_DONTNEED) faults again, and is mapped again from the file rather
    /// than left waiting for a page that will never come again.
    @Test(.enabled(if: pageKinds.contains(.on), "mounting a private tmpfs needs CAP_SYS_ADMIN"))
    func aPlacedPageThatLosesItsMappingIsMappedAgain() throws {
        let target = 0x800, withheld = 0x801
        let (stream, socket, holder) = try handOver(needed: target, withheld, hugePages: .on)
        try stream.writeAll(page(target))
        let deadline = Date(timeIntervalSinceNow: 10)
        while holder.machine == nil && Date() < deadline { usleep(10_000) }
        let machine = try #require(holder.machine)
        let address = machine.memory.mapping.base + target * 4096
        // Placed once the destination reads it back without asking the source (the page is no longer expected).
        usleep(200_000)
        #expect(madvise(address, 4096, MADV_DONTNEED) == 0)
        let seen = Atomic<UInt64>(0)
        let addressBits = UInt(bitPattern: address)
        let reader = Thread { seen.store(UnsafeRawPointer(bitPattern: addressBits)!.load(as: UInt64.self), ordering: .relaxed) }
        reader.start()
        while seen.load(ordering: .relaxed) == 0 && Date() < deadline { usleep(10_000) }
        #expect(seen.load(ordering: .relaxed) == 0x7777_7777_7777_7777, "the page was mapped again while post-copy went on")
        try stream.writeAll(page(withheld))
        try stream.writeFrame(.postcopyEnd, payload: [UInt8]())
        var complete = false
        while !complete {
            let (header, payload) = try stream.readFrame()
            #expect(header.type != .abort, "\(String(decoding: payload, as: UTF8.self))")
            if header.type == .abort { break }
            complete = header.type == .complete
        }
        #expect(complete)
        expectEnds(holder.machine)
        withExtendedLifetime(socket) {}
    }

    @Test(arguments: pageKinds)
    func aRequestedPageSentThreeTimesStopsTheVM(hugePages: HugePages) throws {
        let entryPage = 0x100000 / 4096
        let (stream, socket, holder) = try handOver(needed: entryPage, 0x900, hugePages: hugePages)
        try awaitRequest(for: entryPage, on: stream)
        try stream.writeAll(kernelPage(entryPage))
        try stream.writeAll(kernelPage(entryPage, flags: demandReplyFlag))
        try stream.writeAll(kernelPage(entryPage, flags: demandReplyFlag))
        #expect(try abortReason(stream).contains("sent twice"))
        expectPausedAndStopped(holder)
        withExtendedLifetime(socket) {}
    }

    @Test(arguments: pageKinds)
    func aReplyToARequestNeverMadeStopsTheVM(hugePages: HugePages) throws {
        let target = 0x801
        let (stream, socket, holder) = try handOver(needed: target, hugePages: hugePages)
        try stream.writeAll(page(target, flags: demandReplyFlag))
        #expect(try abortReason(stream).contains("never requested"))
        expectPausedAndStopped(holder)
        withExtendedLifetime(socket) {}
    }

    @Test(arguments: pageKinds)
    func aPageNeverNeededStopsTheVM(hugePages: HugePages) throws {
        let (stream, socket, holder) = try handOver(needed: 0x802, hugePages: hugePages)
        try stream.writeAll(page(0x900))
        #expect(try abortReason(stream).contains("never needed"))
        expectPausedAndStopped(holder)
        withExtendedLifetime(socket) {}
    }

    /// With no address to wait for a resume on (tests only; `tern run --incoming` always has one), a corrupt
    /// frame ends post-copy; with one, it waits for the resume (PostcopyRecoveryTests).
    @Test(arguments: pageKinds)
    func aCorruptFrameIsRefusedBeforeAnyPageIsPlaced(hugePages: HugePages) throws {
        let target = 0x804
        let (stream, socket, holder) = try handOver(needed: target, hugePages: hugePages)
        var corrupt = page(target)
        corrupt[corrupt.count - 1] ^= 0xFF   // the payload no longer matches its CRC
        try stream.writeAll(corrupt)
        #expect(try abortReason(stream).contains("checksum mismatch"))
        expectPausedAndStopped(holder)
        withExtendedLifetime(socket) {}
    }

    /// The vCPU starts on a page still at the source, so it waits for it; then the source
    /// misbehaves. The waiting vCPU stays stopped without burning a CPU, and the VM can still end.
    @Test(arguments: pageKinds)
    func aVcpuWaitingForAPageStaysStoppedWhenPostcopyFails(hugePages: HugePages) throws {
        let entryPage = 0x100000 / 4096
        let (stream, socket, holder) = try handOver(needed: entryPage, hugePages: hugePages)
        // The request for the page proves the vCPU waits for it (the waiter is noted before the request goes).
        while true {
            let (header, payload) = try stream.readFrame()
            if header.type == .pageRequest, try PageRequest(decoding: payload).pages.contains(UInt64(entryPage)) { break }
        }
        let deadline = Date(timeIntervalSinceNow: 10)
        try stream.writeAll(page(0x900))
        #expect(try abortReason(stream).contains("never needed"))
        while holder.machine?.currentState != .paused && Date() < deadline { usleep(10_000) }
        #expect(holder.machine?.currentState == .paused)
        let vcpu = try #require(holder.machine?.vcpuThreadIDs.first)
        let before = try #require(cpuTicks(ofThread: vcpu))
        usleep(500_000)
        let after = try #require(cpuTicks(ofThread: vcpu))
        #expect(after - before < 10, "the waiting vCPU sleeps (\(after - before) ticks in 0.5 s)")
        expectEnds(holder.machine)
        withExtendedLifetime(socket) {}
    }

    @Test(arguments: pageKinds)
    func aPageOutsideGuestMemoryStopsTheVM(hugePages: HugePages) throws {
        let (stream, socket, holder) = try handOver(needed: 0x100, hugePages: hugePages)
        usleep(300_000)
        try stream.writeAll(page((64 << 20) / 4096))
        #expect(try abortReason(stream).contains("outside guest RAM"))
        expectPausedAndStopped(holder)
        withExtendedLifetime(socket) {}
    }
}

final class ResultHolder: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Machine?
    private var error: String?
    func set(_ machine: Machine) { lock.withLock { value = machine } }
    func fail(_ message: String) { lock.withLock { error = message } }
    var machine: Machine? { lock.withLock { value } }
}
