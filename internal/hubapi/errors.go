package hubapi

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
)

// Error codes of IoT Hub's error bodies (the part after "ErrorCode:"),
// which the service SDKs map to their typed errors.
const (
	// CodeArgumentInvalid (400): a malformed or invalid request.
	CodeArgumentInvalid = "ArgumentInvalid"
	// CodeIotHubUnauthorizedAccess (401): no valid token, a token whose
	// scope does not cover the request, or a policy without the right the
	// operation needs. The message is always "Unauthorized".
	CodeIotHubUnauthorizedAccess = "IotHubUnauthorizedAccess"
	// CodeDeviceNotFound (404): no device has the id.
	CodeDeviceNotFound = "DeviceNotFound"
	// CodeNotFound (404): no such API.
	CodeNotFound = "NotFound"
	// CodeMethodNotAllowed (405): the API exists but not with that method.
	CodeMethodNotAllowed = "MethodNotAllowed"
	// CodeDeviceAlreadyExists (409): a device with the id exists.
	CodeDeviceAlreadyExists = "DeviceAlreadyExists"
	// CodeConflict (409): the Kubernetes object the device needs is taken
	// by something else (e.g. a Secret of that name that is not the twin's).
	CodeConflict = "Conflict"
	// CodePreconditionFailed (412): the If-Match etag is not the current one.
	CodePreconditionFailed = "PreconditionFailed"
	// CodeMessageTooLarge (413): the request body is over the limit.
	CodeMessageTooLarge = "MessageTooLarge"
	// CodeThrottlingException (429): the API server is throttling the
	// operator; retry after the Retry-After header.
	CodeThrottlingException = "ThrottlingException"
	// CodeServerError (500): anything else that went wrong on our side.
	CodeServerError = "ServerError"
	// CodeServiceUnavailable (503): the API server is unavailable or timed out.
	CodeServiceUnavailable = "ServiceUnavailable"
)

// apiError is a failed request: what the client is told, and what only the
// log gets.
type apiError struct {
	status int
	code   string
	msg    string
	// cause is logged, never sent: it may hold details of the cluster.
	cause error
	// logMsg, when set, is logged instead of msg (which may quote the
	// client's credentials back to it).
	logMsg string
	// retryAfter, when positive, is sent as Retry-After.
	retryAfter time.Duration
	// allow is the Allow header of a 405.
	allow string
	// reason labels a 401 in the log and kubetwin_service_unauthorized_total.
	reason string
}

func (e *apiError) Error() string { return e.code + ": " + e.msg }

func errorf(status int, code, msg string) *apiError {
	return &apiError{status: status, code: code, msg: msg}
}

func badRequest(msg string) *apiError { return errorf(http.StatusBadRequest, CodeArgumentInvalid, msg) }

func deviceNotFound(id string) *apiError {
	return errorf(http.StatusNotFound, CodeDeviceNotFound, "device "+strconv.Quote(id)+" is not registered")
}

func preconditionFailed(msg string) *apiError {
	return errorf(http.StatusPreconditionFailed, CodePreconditionFailed, msg)
}

// internalError hides err from the client (it is logged).
func internalError(what string, err error) *apiError {
	return &apiError{status: http.StatusInternalServerError, code: CodeServerError,
		msg: what + " failed: internal error (the operator's log has the details under this tracking id)", cause: err}
}

// fromAPI translates an error of the Kubernetes API that the caller has no
// specific answer for. what says what was being done, e.g. "updating the twin".
func fromAPI(what string, err error) *apiError {
	switch {
	case apierrors.IsTooManyRequests(err):
		e := &apiError{status: http.StatusTooManyRequests, code: CodeThrottlingException,
			msg: what + " was throttled by the Kubernetes API server: retry later", cause: err, retryAfter: time.Second}
		if s, ok := apierrors.SuggestsClientDelay(err); ok && s > 0 {
			e.retryAfter = time.Duration(s) * time.Second
		}
		return e
	case apierrors.IsInvalid(err), apierrors.IsBadRequest(err):
		// The API server's own validation (schema, CEL, admission webhook)
		// refused the object: its message is about the request.
		return &apiError{status: http.StatusBadRequest, code: CodeArgumentInvalid, msg: what + ": " + apiMessage(err), cause: err}
	case apierrors.IsTimeout(err), apierrors.IsServerTimeout(err), apierrors.IsServiceUnavailable(err),
		errors.Is(err, context.DeadlineExceeded):
		return &apiError{status: http.StatusServiceUnavailable, code: CodeServiceUnavailable,
			msg: what + " timed out waiting for the Kubernetes API server: retry later", cause: err, retryAfter: time.Second}
	}
	return internalError(what, err)
}

// apiMessage is the message of an API status error.
func apiMessage(err error) string {
	var se apierrors.APIStatus
	if errors.As(err, &se) && se.Status().Message != "" {
		return se.Status().Message
	}
	return err.Error()
}

// errorBody is IoT Hub's error document.
type errorBody struct {
	Message          string `json:"Message"`
	ExceptionMessage string `json:"ExceptionMessage"`
}

// newErrorBody returns the body for code and msg. The SDKs read the code
// as what follows "ErrorCode:" up to ';' and the message as what follows
// up to the next ';', so ';' in msg is written as %3B and an empty msg as
// the code.
func newErrorBody(code, msg, trackingID string, now time.Time) errorBody {
	msg = strings.ReplaceAll(msg, ";", "%3B")
	if msg == "" {
		msg = code
	}
	return errorBody{
		Message:          "ErrorCode:" + code + ";" + msg,
		ExceptionMessage: "Tracking ID:" + trackingID + "-TimeStamp:" + now.UTC().Format("01/02/2006 15:04:05"),
	}
}

// newTrackingID returns a random id that ties an error reply to its log line.
func newTrackingID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // crypto/rand does not fail
	return hex.EncodeToString(b)
}
