/// Which page frames zstd is tried on. While frames compress, every one; after a frame that does
/// not (random or encrypted guest data, or pages already compressed by the guest), the next 1, 2,
/// 4 ... up to 64 frames go raw without being tried, then one is tried again, so incompressible
/// memory costs a sample of the compression time rather than all of it.
public struct CompressionBackoff: Sendable, Equatable {
    public static let maximumSkip = 64
    /// Frames left to send raw before the next try.
    private var skip = 0
    /// How many to skip after the next frame that does not compress.
    private var nextSkip = 1
    /// Frames sent raw untried.
    public private(set) var skippedFrames: UInt64 = 0

    public init() {}

    /// A frame is worth compressing if it shrinks by an eighth or more: less saves too little link
    /// time to pay for compressing and decompressing it.
    public static func worthwhile(input: Int, output: Int) -> Bool { output * 8 <= input * 7 }

    /// Whether to try the next frame; counts it as skipped if not.
    public mutating func shouldTry() -> Bool {
        guard skip > 0 else { return true }
        skip -= 1
        skippedFrames += 1
        return false
    }

    /// What a tried frame came to (`output` nil: zstd could not shrink it at all).
    public mutating func record(input: Int, output: Int?) {
        if let output, Self.worthwhile(input: input, output: output) {
            nextSkip = 1
            return
        }
        skip = nextSkip
        nextSkip = min(nextSkip * 2, Self.maximumSkip)
    }
}
