import TernMachine
import TernWire

/// Counters of what went on the wire.
public struct TransferCounters: Sendable, Equatable {
    public var bytes: UInt64 = 0
    public var dataPages: UInt64 = 0
    public var zeroPages: UInt64 = 0
    public var frames: UInt64 = 0
    public init() {}
}

/// Sends guest pages as `pages` frames: zero pages as markers, data pages
/// gathered straight from guest memory, through an optional rate limit.
/// The checks for cancellation happen between frames.
struct PageSender {
    let memory: GuestMemory
    let stream: FDStream
    var bucket: TokenBucket?
    let shouldStop: () -> Bool
    var counters = TransferCounters()
    /// Called after each frame, for progress reports.
    var onFrame: ((TransferCounters) -> Void)?
    private var batch: PageFrameBatch
    /// Where page bytes are copied before they are checksummed and sent (the guest keeps writing).
    private let staging: StagingBuffer

    struct Stopped: Error {}

    init(memory: GuestMemory, stream: FDStream, bucket: TokenBucket?, shouldStop: @escaping () -> Bool) {
        self.memory = memory
        self.stream = stream
        self.bucket = bucket
        self.shouldStop = shouldStop
        batch = PageFrameBatch(memory: memory)
        staging = StagingBuffer(count: PageFrameBatch.stagingCapacity)
    }

    /// Every page of RAM (the first pre-copy pass); never-written pages go as zero markers unread.
    mutating func sendAll() throws {
        try MemoryScanner(memory: memory).forEachRun { try add($0) }
        try flush()
    }

    /// The given pages, each checked for zero.
    mutating func send(_ pages: PageSet) throws {
        let pageSize = UInt64(PageRun.pageSize)
        var pending: PageRun?
        try pages.forEachRange { first, count in
            for page in first..<first + count {
                let address = memory.address(ofPage: page)
                let bytes = UnsafeRawBufferPointer(start: memory.mapping.base + page * PageRun.pageSize, count: PageRun.pageSize)
                let kind: PageRun.Kind = Checksum.isZero(bytes) ? .zero : .data
                if var run = pending, run.kind == kind, run.pageCount < 1024,
                   run.address.rawValue + UInt64(run.pageCount) * pageSize == address.rawValue {
                    run.pageCount += 1
                    pending = run
                } else {
                    if let run = pending { try add(run) }
                    pending = PageRun(address: address, pageCount: 1, kind: kind)
                }
            }
        }
        if let run = pending { try add(run) }
        try flush()
    }

    private mutating func add(_ run: PageRun) throws {
        if batch.wouldOverflow(run) { try flush() }
        batch.append(run)
        if run.kind == .data { counters.dataPages += UInt64(run.pageCount) } else { counters.zeroPages += UInt64(run.pageCount) }
    }

    mutating func flush() throws {
        guard !batch.isEmpty else { return }
        if shouldStop() { throw Stopped() }
        let size = batch.frameBytes
        bucket?.consume(size)
        try batch.flush(to: stream, staging: staging.buffer)
        counters.bytes += UInt64(size)
        counters.frames += 1
        onFrame?(counters)
    }
}

/// An owned, reusable byte buffer.
final class StagingBuffer {
    let buffer: UnsafeMutableRawBufferPointer
    init(count: Int) { buffer = .allocate(byteCount: count, alignment: 4096) }
    deinit { buffer.deallocate() }
}
