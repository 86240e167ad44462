/// A problem with what the user asked for (a flag, a file): reported as one
/// line and a non-zero exit, never a crash.
public struct ConfigurationError: Error, CustomStringConvertible, Equatable, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
