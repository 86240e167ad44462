import Glibc

/// The guest memory of some chain segments, as host pointers in order, with
/// their guest addresses kept for dirty tracking. Built only from segments
/// `SplitVirtqueue` has checked, so every pointer is inside guest RAM.
struct GuestBuffers {
    struct Piece {
        var address: UInt64
        var pointer: UnsafeMutableRawPointer
        var length: Int
    }

    private(set) var pieces: [Piece] = []
    private(set) var count = 0

    init() {}

    init(_ segments: some Sequence<ChainSegment>, ram: any GuestRAM) {
        for segment in segments where segment.length > 0 {
            guard let pointer = ram.bytes(at: segment.address, count: Int(segment.length)) else { continue }
            pieces.append(Piece(address: segment.address, pointer: pointer, length: Int(segment.length)))
            count += Int(segment.length)
        }
    }

    /// The first `length` bytes and the rest (`length` is clamped to what there is).
    func split(at length: Int) -> (GuestBuffers, GuestBuffers) {
        var head = GuestBuffers(), tail = GuestBuffers()
        var left = max(0, length)
        for piece in pieces {
            if left >= piece.length {
                head.append(piece)
                left -= piece.length
            } else if left > 0 {
                head.append(Piece(address: piece.address, pointer: piece.pointer, length: left))
                tail.append(Piece(address: piece.address + UInt64(left), pointer: piece.pointer + left, length: piece.length - left))
                left = 0
            } else {
                tail.append(piece)
            }
        }
        return (head, tail)
    }

    private mutating func append(_ piece: Piece) {
        pieces.append(piece)
        count += piece.length
    }

    /// Copies out up to `limit` bytes.
    func read(limit: Int) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(min(limit, count))
        for piece in pieces where bytes.count < limit {
            let take = min(piece.length, limit - bytes.count)
            bytes.append(contentsOf: UnsafeRawBufferPointer(start: piece.pointer, count: take))
        }
        return bytes
    }

    /// Copies `bytes` in at byte `offset` of the buffers (as many as fit) and records the write;
    /// returns how many went in.
    @discardableResult
    func write(_ bytes: [UInt8], at offset: Int = 0, ram: any GuestRAM) -> Int {
        var skip = offset, done = 0
        for piece in pieces where done < bytes.count {
            if skip >= piece.length {
                skip -= piece.length
                continue
            }
            let take = min(piece.length - skip, bytes.count - done)
            bytes.withUnsafeBytes { (piece.pointer + skip).copyMemory(from: $0.baseAddress! + done, byteCount: take) }
            ram.noteDeviceWrite(at: piece.address + UInt64(skip), count: take)
            done += take
            skip = 0
        }
        return done
    }

    /// Records that the device wrote the first `length` bytes (after a read(2) into them).
    func noteWritten(_ length: Int, ram: any GuestRAM) {
        var left = length
        for piece in pieces where left > 0 {
            let take = min(piece.length, left)
            ram.noteDeviceWrite(at: piece.address, count: take)
            left -= take
        }
    }

    /// The pieces as iovecs for preadv/pwritev, in batches of at most IOV_MAX.
    func withIOVecs<R>(_ body: ([iovec]) throws -> R) rethrows -> R {
        try body(pieces.map { iovec(iov_base: $0.pointer, iov_len: $0.length) })
    }
}
