package controllers

// IndexTwinsByDeviceID is indexTwinsByDeviceID, for the envtest suite.
var IndexTwinsByDeviceID = indexTwinsByDeviceID
