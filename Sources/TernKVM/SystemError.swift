import Glibc

/// A failed system call or ioctl, with the errno it left behind.
///
/// Every wrapper in this module reports failure through this one type so the
/// layers above can print a precise message ("KVM_CREATE_VM: Device or
/// resource busy") and still switch on the errno when it matters.
public struct SystemError: Error, CustomStringConvertible, Equatable, Sendable {
    public let operation: String
    public let errno: Int32

    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String {
        "\(operation): \(String(cString: strerror(errno)))"
    }
}

/// Maps a -1 return to a thrown `SystemError`, retrying on EINTR unless the
/// caller says an interruption is meaningful (KVM_RUN treats it as an exit).
@inline(__always)
func check(_ operation: @autoclosure () -> String, retryOnInterrupt: Bool = true, _ call: () -> Int32) throws(SystemError) -> Int32 {
    while true {
        let result = call()
        if result != -1 { return result }
        let error = Glibc.errno
        if error == EINTR && retryOnInterrupt { continue }
        throw SystemError(operation(), errno: error)
    }
}
