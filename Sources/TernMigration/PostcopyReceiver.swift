import CKVM
import Foundation
import Glibc
import Logging
import Synchronization
import TernKVM
import TernMachine
import TernWire

/// The destination's side of post-copy. The VM runs while its memory is
/// still arriving: guest memory is registered with userfaultfd, so a vCPU
/// (or KVM on its behalf) touching a page that is not there yet blocks, a
/// request goes to the source, and the page is placed atomically when it
/// arrives (UFFDIO_COPY / UFFDIO_ZEROPAGE), waking the vCPU.
///
/// Pages are accepted only if they are still expected: a page sent twice, a
/// page outside guest RAM, or a demand reply to a request never made stops
/// the VM (paused, not running on corrupted memory) and ends the migration.
final class PostcopyReceiver: @unchecked Sendable {
    // @unchecked Sendable: `expected`, `requested`, `requestTimes`, `latencies` and the counters are guarded by `lock`.
    let machine: Machine
    let memory: GuestMemory
    let source: FDStream
    let logger: Logger
    let uffd: Userfaultfd
    private let lock = NSLock()
    /// Every page the source will send (fixed at the switch). Touching any
    /// other page means zero: the source never wrote it.
    private let needed: PageSet
    /// Needed pages not yet accepted. A page leaves this set when its run is
    /// accepted, a moment before it is placed; a fault in that moment must
    /// still wait for the page, never zero-fill it, so faults consult `needed`.
    private var expected: PageSet
    private var requested: PageSet
    private var requestTimes: [Int: UInt64] = [:]
    private var latencies: [Double] = []
    private var statistics = PostcopyStatistics()
    private let writeLock = NSLock()
    private let finished = Atomic<Bool>(false)
    private var digest: UInt64?
    private let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 << 20, alignment: 4096)

    /// The socket, owned here: post-copy outlives the call that accepted it.
    let connection: FileDescriptor?

    init(machine: Machine, source: FDStream, connection: FileDescriptor?, expected: PageSet, digestOfPresentPages: UInt64?,
         logger: Logger) throws {
        self.connection = connection
        self.machine = machine
        memory = machine.memory
        self.source = source
        self.expected = expected
        needed = expected
        requested = PageSet(pageCount: expected.pageCount)
        digest = digestOfPresentPages
        self.logger = logger
        uffd = try Userfaultfd()
        // Pages still expected may hold stale pre-copy contents: drop them so that touching them faults.
        try expected.forEachRange { first, count in
            guard ckvm_punch_hole(memory.file.rawValue, Int64(first * PageRun.pageSize), Int64(count * PageRun.pageSize)) == 0 else {
                throw SystemError("punching stale pages", errno: errno)
            }
        }
        try uffd.registerMissing(memory.mapping.base, length: memory.mapping.length)
        // A short receive queue: a demand reply must not wait behind megabytes of pushed pages.
        var size: Int32 = 256 << 10
        setsockopt(source.fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit { bounce.deallocate() }

    /// Serves faults and receives pages on two threads; returns at once.
    /// `started` is the monotonic time the VM started, for "memory complete after".
    func start(vmStartedNs: UInt64) {
        // Kept with the VM: if post-copy fails, the userfaultfd must stay open, or the
        // kernel would fill the missing pages with zeros under the waiting vCPUs.
        machine.keepAlive(self)
        machine.memoryIncomplete = true
        spawnThread(named: "postcopy-faults") { [self] in serveFaults() }
        spawnThread(named: "postcopy-pages") { [self] in
            do {
                try receivePages(vmStartedNs: vmStartedNs)
            } catch {
                fail("\(error)")
            }
        }
    }

    private func fail(_ reason: String) {
        guard !finished.exchange(true, ordering: .relaxed) else { return }
        logger.error("post-copy failed: \(reason); the VM is paused rather than run on incomplete memory")
        try? machine.pause()
        writeLock.withLock { _ = try? source.writeFrame(.abort, payload: Array(reason.utf8)) }
    }

    // MARK: Faults

    private func serveFaults() {
        let base = UInt64(UInt(bitPattern: memory.mapping.base))
        while !finished.load(ordering: .relaxed) {
            let faults: [Userfaultfd.Fault]
            do { faults = try uffd.waitForFaults(timeoutMs: 100) } catch {
                fail("\(error)")
                return
            }
            var toRequest: [UInt64] = []
            var toZero: [Int] = []
            let now = Clocks.monotonicNs()
            lock.withLock {
                for fault in faults {
                    let page = Int((fault.address - base) / UInt64(PageRun.pageSize))
                    guard page < expected.pageCount else { continue }
                    statistics.faults += 1
                    if !needed.contains(page) {
                        toZero.append(page)        // never written at the source: zero, no need to ask
                    } else if !requested.contains(page) {
                        requested.insert(page)
                        requestTimes[page] = now
                        toRequest.append(UInt64(page))
                    }
                }
                statistics.requests += UInt64(toRequest.count)
            }
            for page in toZero {
                do {
                    if try uffd.zero(memory.mapping.base + page * PageRun.pageSize, length: PageRun.pageSize) == .placed {
                        lock.withLock { statistics.pagesZeroFilledLocally += 1 }
                    }
                } catch {
                    fail("cannot zero-fill page \(memory.address(ofPage: page)): \(error)")
                    return
                }
            }
            if !toRequest.isEmpty {
                let request = PageRequest(pages: toRequest)
                do {
                    try writeLock.withLock { try source.writeFrame(.pageRequest, payload: request.encoded) }
                } catch {
                    // The vCPUs keep waiting for these pages; the connection is gone.
                    fail("cannot request pages from the source: \(error)")
                    return
                }
            }
        }
    }

    // MARK: Pages

    private func receivePages(vmStartedNs: UInt64) throws {
        while true {
            let header = try source.readFrameHeader()
            switch header.type {
            case .pages:
                try place(header)
            case .postcopyEnd:
                _ = try source.readExactly(Int(header.length), what: "post-copy end")
                let missing = lock.withLock { expected.count }
                guard missing == 0 else { throw WireError.malformed("the source finished with \(missing) pages never sent") }
                finish(vmStartedNs: vmStartedNs)
                return
            case .abort:
                let payload = try source.readExactly(Int(header.length), what: "abort")
                throw WireError.malformed("the source aborted: \(String(decoding: payload, as: UTF8.self))")
            default:
                throw WireError.malformed("unexpected \(header.type) frame during post-copy")
            }
        }
    }

    /// Reads a whole pages frame, checks its CRC, and only then places its
    /// pages: a running vCPU must never see bytes that fail the check.
    private func place(_ header: FrameHeader) throws {
        let demandReply = header.flags & demandReplyFlag != 0
        let length = Int(header.length)
        guard length <= bounce.count else { throw WireError.tooLarge("a post-copy pages frame of \(length) bytes") }
        let frame = UnsafeMutableRawBufferPointer(rebasing: bounce[0..<length])
        try source.readExactly(into: frame, what: "post-copy pages frame")
        guard Checksum.crc32c(UnsafeRawBufferPointer(frame)) == header.payloadCRC else {
            throw WireError.checksumMismatch("pages frame during post-copy")
        }
        var offset = 0
        while offset < length {
            guard length - offset >= PageRun.headerSize else { throw WireError.malformed("pages frame ends inside a run header") }
            let run = try PageRun(decodingHeader: Array(UnsafeRawBufferPointer(rebasing: frame[offset..<offset + PageRun.headerSize])))
            offset += PageRun.headerSize
            guard run.kind != .delta else { throw WireError.malformed("a delta page during post-copy, where each page is sent once") }
            let fileOffset = try memory.fileOffset(of: run.address, length: UInt64(run.byteCount))
            let firstPage = Int(fileOffset) / PageRun.pageSize
            if run.kind == .data && length - offset < run.byteCount { throw WireError.malformed("pages frame ends inside page data") }
            try accept(run, firstPage: firstPage, demandReply: demandReply)
            let target = memory.mapping.base + Int(fileOffset)
            switch run.kind {
            case .zero:
                guard try uffd.zero(target, length: run.byteCount) == .placed else {
                    throw WireError.malformed("page run at \(run.address) is already present")
                }
                if digest != nil {
                    for page in firstPage..<firstPage + Int(run.pageCount) { digest! &+= MemoryDigest.contribution(page: UInt64(page), crc: MemoryDigest.zeroPageCRC) }
                }
            case .delta:
                throw WireError.malformed("a delta page during post-copy")
            case .data:
                let chunk = UnsafeRawBufferPointer(rebasing: frame[offset..<offset + run.byteCount])
                offset += run.byteCount
                guard try uffd.copy(to: target, from: chunk.baseAddress!, length: run.byteCount) == .placed else {
                    throw WireError.malformed("page run at \(run.address) is already present")
                }
                if digest != nil {
                    for i in 0..<Int(run.pageCount) {
                        let page = UnsafeRawBufferPointer(rebasing: chunk[i * PageRun.pageSize..<(i + 1) * PageRun.pageSize])
                        digest! &+= MemoryDigest.contribution(page: UInt64(firstPage + i), crc: Checksum.crc32c(page))
                    }
                }
            }
        }
    }

    /// Checks that every page of a run is still expected (and, for a demand
    /// reply, was requested), and marks it arrived.
    private func accept(_ run: PageRun, firstPage: Int, demandReply: Bool) throws {
        lock.lock()
        defer { lock.unlock() }
        // Read under the lock: request times are too, so `now` is never earlier than one of them.
        let now = Clocks.monotonicNs()
        let pages = firstPage..<firstPage + Int(run.pageCount)
        for page in pages {
            guard expected.contains(page) else {
                throw WireError.malformed("page \(memory.address(ofPage: page)) was sent twice or was never needed")
            }
            if demandReply && !requested.contains(page) {
                throw WireError.malformed("a reply for page \(memory.address(ofPage: page)), which was never requested")
            }
        }
        for page in pages {
            expected.remove(page)
            if demandReply { statistics.pagesPulled += 1 } else { statistics.pagesPushed += 1 }
            if let asked = requestTimes.removeValue(forKey: page) { latencies.append(Clocks.milliseconds(from: asked, to: now)) }
        }
    }

    private func finish(vmStartedNs: UInt64) {
        guard !finished.exchange(true, ordering: .relaxed) else { return } // failed meanwhile: no `complete` after an abort
        machine.memoryIncomplete = false
        try? uffd.unregister(memory.mapping.base, length: memory.mapping.length)
        let report: PostcopyStatistics = lock.withLock {
            var result = statistics
            let sorted = latencies.sorted()
            if !sorted.isEmpty {
                result.faultLatencyP50Ms = sorted[sorted.count / 2]
                result.faultLatencyP99Ms = sorted[min(sorted.count - 1, Int(Double(sorted.count) * 0.99))]
                result.faultLatencyMaxMs = sorted.last!
            }
            result.memoryCompleteAfterMs = Clocks.milliseconds(from: vmStartedNs, to: Clocks.monotonicNs())
            result.memoryDigest = digest.map { String(format: "%016llx", $0) }
            return result
        }
        writeLock.withLock { _ = try? source.writeFrame(.complete, payload: report.encoded) }
        logger.info("post-copy complete: \(report.pagesPushed) pages pushed, \(report.pagesPulled) pulled, \(report.faults) faults, fault latency p50 \(String(format: "%.3f", report.faultLatencyP50Ms)) ms p99 \(String(format: "%.3f", report.faultLatencyP99Ms)) ms; all memory here after \(String(format: "%.0f", report.memoryCompleteAfterMs)) ms")
    }
}
