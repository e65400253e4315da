"""counterwarp.data"""
