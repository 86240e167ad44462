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
/// One exception: the source answers a request for a page it has already
/// pushed with a second copy on the demand channel, so the fault need not
/// wait behind the push's queue; so a page this side asked for may come
/// twice: the first copy to arrive is placed, the second dropped.
///
/// If the connection drops, nothing is lost: vCPUs touching missing pages
/// wait in the kernel, the others run on, and this side listens again on
/// the incoming address for the source's `tern migrate --resume`, tells it
/// which pages it still waits for, asks again for the ones vCPUs wait on,
/// and carries on.
///
/// Fault serving, page placement and recovery are in PostcopyReceiver+Faults,
/// +Pages and +Recovery; the state they share, and the locks that guard it, are here.
final class PostcopyReceiver: @unchecked Sendable {
    // @unchecked Sendable: `expected`, `requested`, `placing`, `requestTimes`, `latencies`, `digest` and the counters are guarded by `lock`;
    // `source`, `connection` and `connected` by `writeLock` (only the pages thread replaces them).
    let machine: Machine
    let memory: GuestMemory
    var source: FDStream
    let logger: Logger
    /// Where to wait for the source after the connection drops (nil: a drop is a failure), and the token it must present.
    let recovery: Endpoint?
    let token: UInt64
    var connected = true
    let uffd: Userfaultfd
    /// Pages are written into the file, where no vCPU sees them, and then mapped with
    /// UFFDIO_CONTINUE (rather than placed by UFFDIO_COPY, which allocates a 4 KiB page
    /// each). Preallocated memory (`--prealloc`): its pages stay in the file and are only
    /// unmapped, so nothing is allocated during post-copy. Huge-page memory: the write
    /// allocates 2 MiB at a time; a hole faults as missing, and a page of a huge page
    /// already there but not yet mapped faults as minor, so both kinds are registered.
    let minorFaults: Bool
    /// The source of zero runs written into the file (minor-fault mode). Small: it is made
    /// during the downtime, where each of its pages costs a page fault to zero (with 4 MiB,
    /// the preallocated post-copy benchmark's downtime was 21.7/23.6 ms; with 64 KiB,
    /// 6.4/4.8 ms); zero runs are rare in post-copy and are written in pieces.
    let zeros: UnsafeMutableRawBufferPointer
    static let zeroBufferBytes = 64 << 10
    /// Data runs are placed this much at a time, so a vCPU waiting for one page of a run waits for this much at most.
    static let placementPieceBytes = 8 * PageRun.pageSize
    let lock = NSLock()
    /// Every page the source will send (fixed at the switch). Touching any
    /// other page means zero: the source never wrote it.
    let needed: PageSet
    /// Needed pages not yet accepted. A page leaves this set when its run is
    /// accepted, a moment before it is placed; a fault in that moment must
    /// still wait for the page, never zero-fill it, so faults consult `needed`.
    var expected: PageSet
    var requested: PageSet
    /// Pages accepted and not yet placed (kept in minor-fault mode only): a fault on a page needed, no
    /// longer expected and not in here means its mapping went (reclaim, say) while the file keeps its contents.
    var placing: PageSet
    /// Requested pages already placed whose second copy may still come (the demand
    /// channel's answer racing the push): dropped once, refused after that.
    var secondCopyAllowed: PageSet
    var requestTimes: [Int: UInt64] = [:]
    var latencies: [Double] = []
    var statistics = PostcopyStatistics()
    let writeLock = NSLock()
    /// Set when post-copy completes or fails; then no page is requested or accepted any more.
    let finished = Atomic<Bool>(false)
    /// Set when all memory is here or the VM ends: then faults are no longer served. After a
    /// failure they still are, for pages the source never wrote, so that vCPUs can park.
    let faultsReleased = Atomic<Bool>(false)
    /// vCPU threads (kernel ids) waiting for a page still expected, and the page.
    var waitingThreads: [Int32: Int] = [:]
    /// The `complete` report once all memory is here (guarded by `writeLock`): sent again if the
    /// source resumes because the first one was lost with the connection.
    var completion: PostcopyStatistics?
    /// How long a completed destination still waits for a source that lost its `complete`.
    static let completedResumeWaitSeconds = 120.0
    var digest: UInt64?
    /// With --verify: arriving pages add to `digest`.
    let verifying: Bool
    let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 << 20, alignment: 4096)
    /// Post-copy's demand channel (QEMU calls it the preempt channel): replies to
    /// page requests arrive here, never queued behind the background push.
    let urgent: Connection?
    let urgentBounce: UnsafeMutableRawBufferPointer
    let urgentDone = DispatchSemaphore(value: 0)
    /// The pre-copy's extra page streams (`--streams`), which carry pushed pages too: a thread
    /// each places them, so that placing fresh pages, post-copy's main cost here, takes more than one core.
    let pushConnections: [Connection]
    let pushBounces: [UnsafeMutableRawBufferPointer]
    /// Left by each push stream's thread when its stream ends (its `postcopyEnd`, or the connection dropped).
    let pushDone = DispatchGroup()

    /// The socket, owned here: post-copy outlives the call that accepted it.
    var connection: Connection?
    /// How a resumed connection is secured: as the first one was.
    let security: ChannelSecurity

    /// Minor-fault mode after pre-copy rounds: the 2 MiB blocks unmapped at the switch (runs of whole blocks,
    /// in pages), whose pages not needed are mapped again once the VM runs (`remapUnneededPages`).
    var unmappedBlocks: [(first: Int, count: Int)] = []
    static let blockPages = (2 << 20) / PageRun.pageSize

    init(machine: Machine, source: FDStream, connection: Connection?, expected: PageSet, digestOfPresentPages: UInt64?,
         urgent: Connection? = nil, pushStreams: [Connection] = [], recovery: Endpoint? = nil, security: ChannelSecurity = .plaintext,
         token: UInt64 = 0, afterPrecopy: Bool = false, logger: Logger) throws {
        self.connection = connection
        self.security = security
        self.urgent = urgent
        pushConnections = pushStreams
        pushBounces = pushStreams.map { _ in .allocate(byteCount: 1 << 20, alignment: 4096) }
        urgentBounce = .allocate(byteCount: urgent == nil ? 0 : 1 << 20, alignment: 4096)
        self.recovery = recovery
        self.token = token
        self.machine = machine
        memory = machine.memory
        self.source = source
        self.expected = expected
        needed = expected
        requested = PageSet(pageCount: expected.pageCount)
        placing = PageSet(pageCount: expected.pageCount)
        secondCopyAllowed = PageSet(pageCount: expected.pageCount)
        digest = digestOfPresentPages
        verifying = digestOfPresentPages != nil
        self.logger = logger
        // Memory that takes pages in place (preallocated, huge pages) has them written into the file and mapped.
        let minorUffd = memory.takesPagesInPlace ? try? Userfaultfd(minorFaults: true) : nil
        minorFaults = minorUffd != nil
        // Missing faults alone would not do: a huge page can hold pages never received, and punching one out only zeroes it.
        guard minorFaults || !memory.usesHugePages else {
            throw MigrationDestination.Refusal("post-copy into huge pages needs userfaultfd minor faults (Linux 5.14)")
        }
        zeros = .allocate(byteCount: minorFaults ? Self.zeroBufferBytes : 0, alignment: 4096)
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        uffd = try minorUffd ?? Userfaultfd()
        let memory = self.memory
        if minorFaults {
            // Expected pages stay in the file (preallocated memory is never punched) but must not be mapped,
            // so that touching them is a minor fault until their contents arrive. After pre-copy rounds
            // (hybrid, auto) the stale pages are scattered over memory the rounds mapped, and unmapping
            // them one run at a time cost 9-10 ms of downtime for random256's 10000 (a call each, splitting
            // huge mappings): whole 2 MiB blocks go instead, in a few calls, and their pages not needed
            // are mapped again once the VM runs. Otherwise little is mapped, and the runs themselves go.
            let ranges = afterPrecopy ? Self.blocks(holding: expected) : expected.ranges
            for (first, count) in ranges {
                guard madvise(memory.mapping.base + first * PageRun.pageSize, count * PageRun.pageSize, MADV_DONTNEED) == 0 else {
                    throw SystemError("unmapping pages still to come", errno: errno)
                }
            }
            if afterPrecopy { unmappedBlocks = ranges }
            if memory.usesHugePages {
                // Keeps khugepaged out while pages are missing: it could map a whole huge page,
                // pages never received included, into the guest's mapping without a fault.
                try memory.mapping.advise(MADV_NOHUGEPAGE)
            }
            // Preallocated memory has no holes; huge-page memory has, until a write allocates around them.
            try uffd.register(memory.mapping.base, length: memory.mapping.length,
                              modes: memory.isPreallocated ? .minor : [.missing, .minor])
        } else {
            // Pages still expected may hold stale pre-copy contents: drop them so that touching them faults.
            try expected.forEachRange { first, count in
                guard ckvm_punch_hole(memory.file.rawValue, Int64(first * PageRun.pageSize), Int64(count * PageRun.pageSize)) == 0 else {
                    throw SystemError("punching stale pages", errno: errno)
                }
            }
            try uffd.registerMissing(memory.mapping.base, length: memory.mapping.length)
        }
        // A short receive queue: a demand reply must not wait behind megabytes of pushed pages.
        var size: Int32 = 256 << 10
        setsockopt(source.fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit {
        bounce.deallocate()
        urgentBounce.deallocate()
        pushBounces.forEach { $0.deallocate() }
        zeros.deallocate()
    }

    /// Serves faults and receives pages on two threads; returns at once.
    /// `started` is the monotonic time the VM started, for "memory complete after".
    func start(vmStartedNs: UInt64) {
        // Kept with the VM: if post-copy fails, the userfaultfd must stay open, or the
        // kernel would fill the missing pages with zeros under the waiting vCPUs.
        machine.keepAlive(self)
        machine.memoryIncomplete = true
        // When the VM ends, vCPUs still waiting for pages are let go, or their threads could never end.
        machine.onExit { [weak self] in self?.releaseFaults() }
        logger.info("post-copy: \(needed.count) pages to come, placed by \(minorFaults ? "writes into the file and UFFDIO_CONTINUE (\(memory.isPreallocated ? "preallocated" : "huge-page") memory)" : "UFFDIO_COPY into 4 KiB pages")")
        spawnThread(named: "postcopy-faults") { [self] in
            makeCurrentThreadLatencyCritical()
            serveFaults()
        }
        if let urgent {
            spawnThread(named: "postcopy-urgent") { [self] in
                makeCurrentThreadLatencyCritical()
                receivePages(on: urgent.stream, .demandChannel, bounce: urgentBounce)
                urgentDone.signal()
            }
        }
        for (index, connection) in pushConnections.enumerated() {
            pushDone.enter()
            spawnThread(named: "postcopy-push-\(index + 1)") { [self] in
                receivePages(on: connection.stream, .pushStream, bounce: pushBounces[index])
                pushDone.leave()
            }
        }
        if !unmappedBlocks.isEmpty {
            spawnThread(named: "postcopy-remap") { [self] in remapUnneededPages() }
        }
        spawnThread(named: "postcopy-pages") { [self] in
            do {
                try receivePages(vmStartedNs: vmStartedNs)
            } catch {
                fail("\(error)")
            }
        }
    }

    func fail(_ reason: String) {
        guard !finished.exchange(true, ordering: .relaxed) else { return }
        logger.error("post-copy failed: \(reason); the VM is paused rather than run on incomplete memory")
        let waiting = lock.withLock { Set(waitingThreads.keys) }
        let unparked = machine.pauseForGood(waitingForMemory: waiting)
        if unparked > 0 {
            logger.warning("\(unparked) vCPU(s) wait for guest memory that will not come; they stay stopped until the VM ends")
        }
        writeLock.withLock { _ = try? source.writeFrame(.abort, payload: Array(reason.utf8)) }
    }

    /// The VM is ending: stop serving faults and unregister guest memory, which wakes any
    /// vCPU still waiting for a page (it then sees a zero page, and stops at once).
    func releaseFaults() {
        guard !faultsReleased.exchange(true, ordering: .relaxed) else { return }
        try? uffd.unregister(memory.mapping.base, length: memory.mapping.length)
        // Huge pages for the guest's mapping again (khugepaged maps them whole in time).
        if minorFaults && memory.usesHugePages { try? memory.mapping.advise(MADV_HUGEPAGE) }
    }
}
