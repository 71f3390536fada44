-- Argo CD health check for kubetwin.io/DeviceTwin (resource.customizations.health.kubetwin.io_DeviceTwin).
-- Healthy:     the operator has seen the current spec and the device reports every desired value (InSync True).
-- Progressing: not yet seen by the operator, or the device has not yet acknowledged or applied the desired
--              state (InSync False with reason DesiredNotSeen or Converging, also while the device is offline).
-- Degraded:    the operator refused the spec (InSync False, reason InvalidDesired), or another DeviceTwin owns
--              the device id (Connected False, reason DuplicateDeviceID): Git must change, waiting will not help.
-- The same script is the check for kubetwin.io/TwinConfiguration (resource.customizations.health.kubetwin.io_TwinConfiguration):
-- Healthy:     Ready True: every targeted twin the configuration wins has its content and reports it back.
-- Progressing: not yet seen by the operator, content being applied, or devices yet to report it (Ready False).
-- Suspended:   the staged rollout is paused (Progressing False, reason RolloutPaused).
-- Degraded:    Stalled True: the configuration is invalid (InvalidConfiguration) or its rollout halted on its
--              health metric (RolloutHalted).
-- Argo CD runs this without Lua's string library (only base and table), so it uses .. and tostring only.
local hs = {}

local function condition(conditionType)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == conditionType then
      return c
    end
  end
  return nil
end

local function text(c)
  if c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return tostring(c.reason)
end

local generation = tonumber(obj.metadata.generation) or 0

if obj.kind == "TwinConfiguration" then
  local observedConfig = 0
  if obj.status ~= nil and obj.status.observedGeneration ~= nil then
    observedConfig = tonumber(obj.status.observedGeneration) or 0
  end
  if observedConfig < generation or observedConfig == 0 then
    hs.status = "Progressing"
    hs.message = "Waiting for the kubetwin operator to see generation " .. tostring(generation) .. " of the configuration"
    return hs
  end
  local stalled = condition("Stalled")
  if stalled ~= nil and stalled.status == "True" then
    hs.status = "Degraded"
    hs.message = text(stalled)
    return hs
  end
  local ready = condition("Ready")
  if ready ~= nil and ready.status == "True" then
    hs.status = "Healthy"
    hs.message = text(ready)
    return hs
  end
  local progressing = condition("Progressing")
  if progressing ~= nil and progressing.reason == "RolloutPaused" then
    hs.status = "Suspended"
    hs.message = text(progressing)
    return hs
  end
  hs.status = "Progressing"
  if ready ~= nil then
    hs.message = text(ready)
  else
    hs.message = "Waiting for the Ready condition"
  end
  return hs
end

if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetwin operator to see the twin"
  return hs
end
local observed = tonumber(obj.status.observedGeneration) or 0
if observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetwin operator to see generation " .. tostring(generation) ..
    " (status is for " .. tostring(observed) .. ")"
  return hs
end

local connected = condition("Connected")
if connected ~= nil and connected.status == "False" and connected.reason == "DuplicateDeviceID" then
  hs.status = "Degraded"
  hs.message = text(connected)
  return hs
end

local inSync = condition("InSync")
if inSync == nil or (inSync.observedGeneration ~= nil and (tonumber(inSync.observedGeneration) or 0) < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the InSync condition of generation " .. tostring(generation)
  return hs
end
if inSync.status == "True" then
  hs.status = "Healthy"
  hs.message = text(inSync)
  return hs
end
if inSync.reason == "InvalidDesired" then
  hs.status = "Degraded"
  hs.message = text(inSync)
  return hs
end

-- DesiredNotSeen, Converging, or a reason this check does not know yet: the device is on its way.
hs.status = "Progressing"
hs.message = text(inSync)
if connected ~= nil and connected.status ~= "True" then
  hs.message = hs.message .. " (device " .. tostring(connected.reason) .. ")"
end
return hs
