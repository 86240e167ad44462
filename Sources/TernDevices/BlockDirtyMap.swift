import Synchronization

/// Which 4 KiB blocks of a disk the guest has changed since they were last
/// taken: the storage migration's equivalent of KVM's dirty log. Tern is the
/// block backend, so it sees every write, discard and write-zeroes; the
/// device marks their blocks after the image has changed, so a sender that
/// takes (clears) a block's bit before reading it either reads the new data
/// or finds the bit set again and sends the block once more.
///
/// Marking costs one uncontended lock per request while a migration tracks
/// writes, and a flag test otherwise.
public final class BlockDirtyMap: Sendable {
    public static let blockSize = 4096
    public let blockCount: Int
    private let state: Mutex<State>

    private struct State {
        var tracking = false
        var words: [UInt64]
        var count = 0
    }

    public init(diskSize: UInt64) {
        blockCount = Int((diskSize + UInt64(Self.blockSize) - 1) / UInt64(Self.blockSize))
        state = Mutex(State(words: [UInt64](repeating: 0, count: (blockCount + 63) / 64)))
    }

    /// Starts recording writes, with nothing marked.
    public func startTracking() {
        state.withLock { state in
            state.tracking = true
            for i in state.words.indices { state.words[i] = 0 }
            state.count = 0
        }
    }

    /// Stops recording and forgets what was marked.
    public func stopTracking() {
        state.withLock { state in
            state.tracking = false
            for i in state.words.indices { state.words[i] = 0 }
            state.count = 0
        }
    }

    public var isTracking: Bool { state.withLock { $0.tracking } }

    /// Blocks marked and not taken yet.
    public var dirtyCount: Int { state.withLock { $0.count } }

    /// Marks the blocks that `length` bytes at `offset` touch (nothing unless tracking).
    public func mark(offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        let first = Int(offset / UInt64(Self.blockSize))
        let last = min(Int((offset + length - 1) / UInt64(Self.blockSize)), blockCount - 1)
        guard first <= last else { return }
        state.withLock { state in
            guard state.tracking else { return }
            for block in first...last {
                let bit = UInt64(1) << UInt64(block & 63)
                if state.words[block >> 6] & bit == 0 {
                    state.words[block >> 6] |= bit
                    state.count += 1
                }
            }
        }
    }

    /// Takes (clears) the first run of consecutive marked blocks at or after `start`, at most `maximum`
    /// long; nil when none is marked from there on.
    public func takeRun(from start: Int, maximum: Int) -> Range<Int>? {
        state.withLock { state in
            guard state.count > 0, start < blockCount, maximum > 0 else { return nil }
            var index = start >> 6
            var word = state.words[index] & (UInt64.max << UInt64(start & 63))
            while word == 0 {
                index += 1
                guard index < state.words.count else { return nil }
                word = state.words[index]
            }
            let first = index * 64 + word.trailingZeroBitCount
            var end = first
            while end < blockCount, end - first < maximum {
                let bit = UInt64(1) << UInt64(end & 63)
                guard state.words[end >> 6] & bit != 0 else { break }
                state.words[end >> 6] &= ~bit
                end += 1
            }
            state.count -= end - first
            return first..<end
        }
    }
}
